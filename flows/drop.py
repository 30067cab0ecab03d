"""`qlora-ops drop FILE`: validate one data file, then put it into `data.source`.

    qlora-ops drop tickets-week07.jsonl --params params/team.yaml

- Validated first, with the same readers and row checks as `check` and `run` (tasks.data.prepare.open_rows),
  then against the current data (the workspace's last snapshot in data.raw, or a directory source itself)
  as a run would prepare it: a row conflicting with an earlier drop, a wrong label, a split-setting change
  are refused naming file:line, before anything is written or any run is triggered. A file whose name is
  already there with other bytes is refused: a drop never replaces one (corrections: README "Corrections").
- A bucket source (s3://bucket/prefix/): one PutObject with the dropper's own key from the environment
  (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE; never the params file). The key needs
  nothing but s3:PutObject under the prefix: no list, no read. The event comes from the bucket's
  notification through the relay (flows/relay.py), so the dropper holds no Prefect secret.
- A directory source (one machine, no bucket): the file is copied under a hidden temporary name and
  renamed into place (a snapshot never sees half a file), then `drop` sends the event itself to
  PREFECT_API_URL (with PREFECT_API_AUTH_STRING where the server needs it).

Either way the retraining deployment's trigger (flows/triggers.py) starts a run orchestration.debounce_s
after the last drop; dropping the same file again changes no data, and that run ends Skipped.
"""
from __future__ import annotations

import getpass
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from qlora_ops.flows.events import EventsUnavailable, api_url, drop_event, is_data_key, local_url, post_events
from qlora_ops.tasks.core.config import Params, ParamsError
from qlora_ops.tasks.data import quarantine
from qlora_ops.tasks.data.prepare import DataError, open_rows
from qlora_ops.tasks.core.paths import ws_path
from qlora_ops.tasks.core.secrets import redact_url
from qlora_ops.tasks.data.sources import _open_fs, is_network_error, is_url


class DropNotAnnounced(EventsUnavailable):
    """The file is in place but the Prefect server did not take its event."""


def validate(path: Path, params: Params) -> dict:
    """{"rows": n, "format": ...} of a valid data file; DataError naming every bad file:line otherwise."""
    with tempfile.TemporaryDirectory(prefix="qlora-ops-drop-") as tmp:
        ds, formats = open_rows(path, params.data, Path(tmp))
        rows = ds.num_rows
        del ds  # the memory map must close before the directory goes
    return {"rows": rows, "format": ", ".join(sorted(set(formats.values())))}


def _target(params: Params, workspace: Path) -> str:
    src = params.data.source
    if not src:
        raise ParamsError("data.source is null: there is nowhere to drop into; set data.source to a directory or "
                          "a bucket prefix (s3://bucket/drops/) that runs snapshot, or put the file in data.raw")
    local = None if is_url(src) else ws_path(workspace, src.removeprefix("file://"))
    one_file = (local.is_file() or (not local.exists() and is_data_key(local.name))) if local is not None else \
        (not src.endswith("/") and is_data_key(src.rsplit("/", 1)[-1]))
    if one_file:
        raise ParamsError(f"data.source={redact_url(src)!r} is one file; `drop` adds files to a directory or bucket "
                          "prefix: point data.source at one (e.g. s3://bucket/drops/ or data/incoming/)")
    return src if local is None else str(local)


def drop(file: Path, params: Params, workspace: Path) -> dict:
    """Validate `file` and put it into data.source; announce it when the source is a directory.

    {"url": where it landed, "rows", "format", "event": the event sent, or None (a bucket: the relay sends
    it; a directory without PREFECT_API_URL: no server to tell)}. ParamsError / DataError before anything is written; ConnectionError when the bucket is
    unreachable; DropNotAnnounced when the file is in place but the event was not taken."""
    file = Path(file)
    if not file.is_file():
        raise DataError(f"{file}: not a file; `drop` takes one .jsonl, .csv, .parquet or .arrow file")
    if not is_data_key(file.name):
        raise DataError(f"{file}: runs read only *.jsonl, *.csv, *.parquet and *.arrow files whose names do not "
                        "start with '.' or '_'; rename the file")
    target = _target(params, Path(workspace))
    info = validate(file, params)
    # against the current data too: a row that conflicts with an earlier drop would block every run
    quarantine.check_drop(file, params, Path(workspace), None if is_url(target) else Path(target))
    if is_url(target):
        return {**info, "url": _upload(file, target, params.data.source_options), "event": None}
    dest = _copy_into(file, Path(target))
    if api_url() is None:  # one machine without a Prefect server: nothing listens for an event
        return {**info, "url": str(dest), "event": None}
    event = drop_event(local_url(dest), size=dest.stat().st_size, by=_user(), via="qlora-ops drop")
    try:
        post_events([event])
    except EventsUnavailable as e:
        raise DropNotAnnounced(f"{dest} is in place, but its event was not sent ({e}); the next scheduled run "
                               "picks it up, or drop the file again once the Prefect server answers") from e
    return {**info, "url": str(dest), "event": event}


def _upload(file: Path, source: str, options: dict[str, str]) -> str:
    fs, root = _open_fs(source, options)
    url = f"{source.rstrip('/')}/{file.name}"
    try:
        # put_file is one PutObject (a multipart upload for large files, which the same permission
        # covers): no HEAD, no listing, so a put-only key suffices.
        fs.put_file(str(file), f"{root.rstrip('/')}/{file.name}")
    except PermissionError as e:
        raise ParamsError(f"{redact_url(url)}: access denied ({e}); the dropper's key (AWS_ACCESS_KEY_ID / "
                          "AWS_SECRET_ACCESS_KEY in the environment) needs s3:PutObject on that prefix") from None
    except Exception as e:
        if is_network_error(e):
            raise ConnectionError(f"{redact_url(url)}: could not reach the bucket ({type(e).__name__}: "
                                  f"{redact_url(str(e))}); check data.source_options (endpoint_url)") from e
        raise
    return url


def _copy_into(file: Path, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / file.name
    tmp = directory / f".{file.name}.drop-{uuid.uuid4().hex[:8]}"  # hidden: never read as data
    try:
        shutil.copyfile(file, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (a container's arbitrary uid): the event just does not say who
        return None
