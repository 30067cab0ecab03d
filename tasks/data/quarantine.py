"""Drops that cannot block the loop: a drop that fails validation is set aside, the run goes on.

    s3://team/drops/week07.jsonl  ->  s3://team/quarantine/week07.jsonl
                                      s3://team/quarantine/week07.jsonl.reason.txt   (the error, file:line)

Before `dvc add` and `dvc repro` (DVC deletes a stage's outputs before running it, and a failed prepare
would leave them deleted), the snapshot of data.source is validated exactly as prepare would run it
(tasks.data.prepare.prepare into a scratch directory: rows, labels, conflicts, split settings). When it
fails, the files this snapshot added or changed are tried one at a time in name order on top of the
files already there; each that makes it fail is moved from the source into the quarantine prefix (beside
the source: `<parent>/quarantine/`, or `_quarantine/` inside a source with no parent, which snapshots
skip) with a reason file, and the snapshot is taken again: the run goes on with the last good data.
The worker's key needs read + delete on the source prefix and put on the quarantine prefix.
An error that no new file causes (old data, params, a split-setting change) still fails the run.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from qlora_ops.tasks.core.config import Params
from qlora_ops.tasks.core.secrets import redact_url
from qlora_ops.tasks.data.prepare import DataError, prepare
from qlora_ops.tasks.data.readers import _is_saved
from qlora_ops.tasks.core.paths import ws_path
from qlora_ops.tasks.data.sources import _open_fs, is_url, snapshot

REASON = ".reason.txt"


def check(params: Params, workspace: Path, raw: Path) -> dict:
    """prepare() of `raw` into a scratch directory (the lineage is read, never written): its stats, or
    DataError / ParamsError naming file:line or the key."""
    d = params.data.model_copy(update={"raw": str(raw)})
    with tempfile.TemporaryDirectory(prefix="qlora-ops-validate-") as tmp:
        return prepare(params.model_copy(update={"data": d}), workspace, out=Path(tmp) / "prepared")


def _unit(raw: Path, rel: str) -> str:
    """The unit a file belongs to: itself, or the top `save_to_disk` directory holding it."""
    parts = PurePosixPath(rel).parts
    for i in range(1, len(parts)):
        if _is_saved(raw.joinpath(*parts[:i])):
            return "/".join(parts[:i])
    return rel


def culprits(params: Params, workspace: Path, raw: Path, new: list[str]) -> dict[str, str]:
    """{unit: error} for each new unit (added or changed in this snapshot) that makes the data fail, tried
    in name order on top of the unchanged files and the new units accepted so far. {} when the unchanged
    files fail by themselves (then no drop is to blame)."""
    files = sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file())
    units = sorted({_unit(raw, r) for r in new})
    old = [f for f in files if _unit(raw, f) not in units]
    bad: dict[str, str] = {}
    accepted: list[str] = []
    with tempfile.TemporaryDirectory(prefix=f".{raw.name}.validate-", dir=raw.parent) as tmp:
        def try_with(extra: list[str]) -> str | None:
            view = Path(tmp) / "view"
            shutil.rmtree(view, ignore_errors=True)
            for f in old + [f for f in files if _unit(raw, f) in extra]:
                (view / f).parent.mkdir(parents=True, exist_ok=True)
                os.link(raw / f, view / f)  # same file system (beside raw): no copy
            try:
                check(params, workspace, view)
            except DataError as e:
                return str(e).replace(str(view), str(raw))
            return None

        if old and try_with([]) is not None:
            return {}
        for u in units:
            if (err := try_with(accepted + [u])) is None:
                accepted.append(u)
            else:
                bad[u] = err
    return bad


def quarantine_url(source: str) -> str:
    """`quarantine/` beside the source prefix, or `_quarantine/` inside it when it has no parent prefix."""
    root = source.rstrip("/")
    if is_url(root):
        scheme, path = root.split("://", 1)
        return f"{scheme}://{path.rsplit('/', 1)[0]}/quarantine" if "/" in path else f"{root}/_quarantine"
    return str(Path(root.removeprefix("file://")).parent / "quarantine")


def move(source: str, options: dict[str, str], unit: str, reason: str) -> str:
    """Move one unit (a file, or a save_to_disk directory) of the source into the quarantine prefix, with
    `<name>.reason.txt` beside it; returns where it went (redacted)."""
    fs, root = _open_fs(source, options)
    qurl = quarantine_url(source)
    qfs, qroot = _open_fs(qurl, options) if is_url(qurl) else _open_fs(qurl, None)
    src, dst = f"{root.rstrip('/')}/{unit}", f"{qroot.rstrip('/')}/{unit}"
    if not is_url(qurl):
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
    if fs.isdir(src):
        fs.copy(src, dst, recursive=True)
    else:
        fs.copy(src, dst)
    with qfs.open(dst + REASON, "w") as f:
        f.write(reason + "\n")
    fs.rm(src, recursive=True)  # last: a failed copy leaves the drop where it was
    return redact_url(f"{qurl}/{unit}")


def listed(source: str | None, options: dict[str, str] | None = None) -> list[dict]:
    """[{"name", "reason"}] of the quarantined drops of a source (for `status`); [] when none."""
    if not source:
        return []
    qurl = quarantine_url(source)
    fs, root = _open_fs(qurl, options if is_url(qurl) else None)
    try:
        found = fs.find(root)
    except FileNotFoundError:
        return []
    out = []
    for p in sorted(found):
        rel = PurePosixPath(fs._strip_protocol(p)).relative_to(PurePosixPath(fs._strip_protocol(root))).as_posix()
        if rel.endswith(REASON):
            with fs.open(p, "r") as f:
                out.append({"name": rel[:-len(REASON)], "reason": f.read().strip()})
    return out


def validated(workspace: Path, params: Params, raw: Path, src: str, summary: dict) -> dict:
    """The snapshot `summary` (tasks.data.sources.snapshot of `src` into `raw`), checked before anything is
    versioned: a new drop that fails validation goes to the quarantine prefix with its reason and the
    snapshot is taken again without it. Adds summary["quarantined"]: [{"name", "to", "reason"}]."""
    try:
        check(params, workspace, raw)
        return {**summary, "quarantined": []}
    except DataError:
        new = summary["added"] + summary["changed"]
        bad = culprits(params, workspace, raw, new) if new else {}
        if not bad:  # the data already there, or the params, fail: no drop to set aside
            raise
    moved = [{"name": u, "to": move(src, params.data.source_options, u, err), "reason": err} for u, err in bad.items()]
    for m in moved:
        print(f"quarantined drop {m['name']} -> {m['to']}: {m['reason'][:500]}")
    again = snapshot(src, raw, params.data.source_options)
    check(params, workspace, raw)
    # what this run took in: the first snapshot's changes, less the drops set aside
    took = {k: [f for f in summary[k] if f in again["files"]] for k in ("added", "changed")}
    return {**again, **took, "removed": sorted(set(summary["removed"]) | set(again["removed"])),
            "ignored": summary["ignored"], "quarantined": moved}


def check_raw(workspace: Path, params: Params) -> None:
    """data.raw without a source, validated before `dvc add` / `dvc repro` (a built-in sample not built yet
    is skipped: nothing to lose)."""
    raw = ws_path(workspace, params.data.raw)
    if raw.exists():
        check(params, workspace, raw)


def check_drop(file: Path, params: Params, workspace: Path, local_source: Path | None) -> None:
    """A drop checked against the current data before it is put anywhere: the workspace's last snapshot
    (data.raw) or, for a directory source, the source itself, plus this file, prepared exactly as a run
    would (conflicts with earlier rows, labels, schema, format, split settings). Refuses a file whose name
    is already there with other bytes: drops are never replaced silently. DataError naming file:line."""
    import filecmp

    raw = ws_path(workspace, params.data.raw)
    current = local_source if local_source is not None and local_source.is_dir() else raw if raw.is_dir() else None
    if current is None:
        return  # nothing known yet (a bucket never snapshotted here): the run validates it (quarantine)
    same = current / file.name
    if same.is_file() and not filecmp.cmp(same, file, shallow=False):
        raise DataError(f"{file}: a different file named {file.name} is already in the data ({same}); a drop never "
                        f"replaces one. Drop it under a new name (e.g. {file.stem}-2{file.suffix}); to change earlier "
                        f"rows, drop a corrections file ({file.stem}.corrections{file.suffix}, README \"Corrections\")")
    with tempfile.TemporaryDirectory(prefix="qlora-ops-drop-") as tmp:
        view = Path(tmp) / current.name
        shutil.copytree(current, view, ignore=shutil.ignore_patterns(".*", "_*"))
        shutil.copyfile(file, view / file.name)
        try:
            check(params, workspace, view)
        except DataError as e:
            raise DataError(str(e).replace(str(view / file.name), str(file)).replace(str(view), str(current))
                            + f"\n(checked against the current data in {current})") from None
