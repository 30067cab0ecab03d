"""Where new domain data lands (`data.source`): mirror its data files into the DVC-tracked `data.raw`.

    snapshot("s3://team-data/drops/", Path("data/raw/team"), {"endpoint_url": "http://minio:9000"})

The source is a local directory, one local file, or any fsspec URL (s3://bucket/prefix/, gs://, ...);
`options` are fsspec storage options, credentials come from the environment (AWS_ACCESS_KEY_ID, ...).
Data files are *.jsonl, *.csv, *.parquet, *.arrow at any depth, and the index files of a `datasets`
`save_to_disk` directory (state.json, dataset_info.json, dataset_dict.json: tasks.data.readers.is_data_name), so
such a directory mirrors whole; anything else is ignored and listed, as is
every path with a part starting with "." or "_" (editor temp files, `_SUCCESS`, `_temporary/`: the
pyarrow/Spark convention for "not data").

The mirror is exact (new and changed files copied, files gone from the source removed) and
crash-safe: everything to copy is first downloaded into a staging directory beside `dest`, then
renamed into place, so a file under its final name is always complete, and a failed download
leaves `dest` as it was.
"""
from __future__ import annotations

import filecmp
import os
import re
import shutil
import uuid
from pathlib import Path, PurePosixPath

from qlora_ops.tasks.core.config import ParamsError
from qlora_ops.tasks.data.readers import DATA_SUFFIXES, is_data_name
from qlora_ops.tasks.core.secrets import redact_url
from qlora_ops.tasks.core.util import md5_file

_KINDS = "*.jsonl, *.csv, *.parquet or *.arrow (a datasets save_to_disk directory)"
_FIX = (f"set data.source to an existing directory, file or URL (e.g. s3://bucket/drops/) holding {_KINDS} "
        "drops, or to null to use data.raw as it is")

# ---------------------------------------------------------------- source access
def is_url(source: str) -> bool:
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", source)) and not source.startswith("file://")


def _options(options: dict[str, str] | None) -> dict:
    # Params hold strings; "true"/"false" mean booleans to every fsspec backend (e.g. anon: "true").
    out = {}
    for k, v in (options or {}).items():
        out[k] = {"true": True, "false": False}.get(v.lower(), v) if isinstance(v, str) else v
    return out


def _open_fs(source: str, options: dict[str, str] | None):
    import fsspec

    try:
        # skip_instance_cache + invalidate_cache: a long-lived worker must see this run's listing, not a
        # cached one from last week's run.
        fs, root = fsspec.core.url_to_fs(source, skip_instance_cache=True, **_options(options))
    except (ImportError, ValueError) as e:
        raise ParamsError(f"data.source={redact_url(source)!r}: cannot open it ({e}); use a local path or a URL "
                          f"whose fsspec backend is installed (s3:// needs s3fs), and check data.source_options"
                          ) from None
    except TypeError as e:
        raise ParamsError(f"data.source_options: not accepted by the backend of {redact_url(source)!r} ({e}); "
                          "remove or fix the option") from None
    fs.invalidate_cache()
    return fs, root.rstrip("/") or root


# Network-level failure texts as the clients we use word them (botocore/s3fs via DVC and sources,
# requests/urllib3 via MLflow, httpx via Prefect). Matched on the message too, because MLflow wraps
# them in MlflowException. The one classifier of "another try may cure it" (flows.faults uses it).
_NETWORK = re.compile(r"(could not|cannot|can't|unable to) connect|connect call failed|"
                      r"connect(ion)?[ _-]?(refused|reset|aborted|timeout|error)|timed out|"
                      r"name or service not known|name resolution|\b(500|502|503|504)\b|service ?unavailable|"
                      r"slow ?down|remote ?disconnected|broken pipe|max retries exceeded|temporarily unavailable|"
                      r"too many 5\d\d|bad gateway|gateway time-?out|readtimeout|connecttimeout", re.I)


def is_network_error(exc: BaseException) -> bool:
    """A fault another try may cure: builtin ConnectionError/TimeoutError, or a client library's own
    (botocore's EndpointConnectionError, aiohttp's ClientConnectorError, ...), or a 5xx/throttle text."""
    if isinstance(exc, (FileNotFoundError, PermissionError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if any("Connect" in c.__name__ or "Timeout" in c.__name__ for c in type(exc).__mro__):
        return True
    return bool(_NETWORK.search(f"{type(exc).__name__}: {exc}"))


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in PurePosixPath(rel).parts)


def _etag_md5(info: dict) -> str | None:
    """The object's MD5 where the store reports one (S3 single-part ETag), else None."""
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"').lower()
    return etag if re.fullmatch(r"[0-9a-f]{32}", etag) else None


def _listing(fs, root: str, source: str) -> tuple[dict[str, dict], list[str], bool]:
    """({relative name: info} of data files, [ignored names], source is a single file)."""
    shown = redact_url(source)
    try:
        info = fs.info(root)
    except FileNotFoundError:
        raise ParamsError(f"data.source={shown!r}: not found; {_FIX}") from None
    except PermissionError as e:
        raise ParamsError(f"data.source={shown!r}: access denied ({e}); give the worker read access (credentials "
                          "come from the environment, e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)") from None
    if info.get("type") == "file":
        name = PurePosixPath(root).name
        if not is_data_name(name):
            raise ParamsError(f"data.source={shown!r}: a single-file source must be a {_KINDS} file; {_FIX}")
        return {name: info}, [], True
    try:
        found = fs.find(root, detail=True)
    except PermissionError as e:
        raise ParamsError(f"data.source={shown!r}: access denied listing it ({e}); give the worker list and read "
                          "access (credentials come from the environment)") from None
    data, ignored = {}, []
    for path, i in found.items():
        if i.get("type", "file") != "file":
            continue
        rel = PurePosixPath(fs._strip_protocol(path)).relative_to(PurePosixPath(root)).as_posix()
        if rel in ("", "."):
            continue
        if is_data_name(rel) and not _hidden(rel):
            data[rel] = i
        else:
            ignored.append(rel)
    if not data:
        what = f"only {', '.join(sorted(ignored)[:5])}{' ...' if len(ignored) > 5 else ''}" if ignored else "nothing"
        raise ParamsError(f"data.source={shown!r}: holds no data file ({what}); put {_KINDS} files there or {_FIX}")
    return data, sorted(ignored), False


def _local_files(dest: Path) -> dict[str, Path]:
    return {p.relative_to(dest).as_posix(): p for p in dest.rglob("*") if p.is_file() or p.is_symlink()}


def _same(fs, src: str, info: dict, local: Path, staged: Path, is_local: bool) -> bool:
    """Does `local` already hold the bytes of source file `src`? May download it to `staged` (then kept
    there for the copy when it differs)."""
    if not local.is_file() or local.stat().st_size != info.get("size"):
        return False
    if is_local:
        return filecmp.cmp(src, local, shallow=False)
    md5 = _etag_md5(info)
    if md5 is not None and md5 == md5_file(local):
        return True
    # No MD5 from the store (multipart upload, KMS, other backends): compare the bytes themselves.
    staged.parent.mkdir(parents=True, exist_ok=True)
    fs.get_file(src, str(staged))
    if filecmp.cmp(staged, local, shallow=False):
        staged.unlink()
        return True
    return False


def snapshot(source: str, dest: Path, options: dict[str, str] | None = None) -> dict:
    """Mirror the data files of `source` into the directory `dest`; return what changed.

    {"files": sorted names now in dest, "added": [...], "changed": [...], "removed": [...],
     "ignored": [non-data names in the source], "bytes": total size of dest's files, "copied_bytes": int,
     "source": the source URL, redacted}. Raises ParamsError (naming data.source) when the source does
    not exist or holds no data file."""
    source, dest = str(source), Path(dest)
    is_local = not is_url(source)
    if is_local:
        src_path = Path(source.removeprefix("file://")).expanduser().resolve()
        d = dest.resolve()
        if src_path == d or src_path in d.parents or (src_path.is_dir() and d in src_path.parents):
            raise ParamsError(f"data.source={source!r} and data.raw={str(dest)!r} overlap; data.raw is the snapshot "
                              "of the source and must be a separate directory")
        source = str(src_path)
    if dest.exists() and not dest.is_dir():
        raise ParamsError(f"data.raw={str(dest)!r} is a file; with data.source set, data.raw must be a directory "
                          "(the snapshot of the source), e.g. data/raw/my-domain")
    try:
        fs, root = _open_fs(source, options)
        data, ignored, single = _listing(fs, root, source)
        return _mirror(fs, root, source, data, ignored, single, dest, is_local)
    except ParamsError:
        raise
    except Exception as e:
        if is_network_error(e):
            # A builtin ConnectionError: the flow retries it (transient), unlike bad params.
            raise ConnectionError(f"data.source={redact_url(source)!r}: could not reach it ({type(e).__name__}: "
                                  f"{redact_url(str(e))}); check the network and data.source_options (e.g. "
                                  "endpoint_url)") from e
        raise


def _mirror(fs, root: str, source: str, data: dict, ignored: list[str], single: bool, dest: Path,
            is_local: bool) -> dict:
    dest.mkdir(parents=True, exist_ok=True)
    have = _local_files(dest)
    staging = dest.parent / f".{dest.name}.snapshot-{uuid.uuid4().hex[:8]}"
    for old in dest.parent.glob(f".{dest.name}.snapshot-*"):  # left by a crashed run
        shutil.rmtree(old, ignore_errors=True)
    added, changed, copied = [], [], 0
    try:
        todo = []
        for rel, info in sorted(data.items()):
            src = root if single else f"{root}/{rel}"
            staged = staging / rel
            if rel in have and _same(fs, src, info, dest / rel, staged, is_local):
                continue
            if not staged.exists():
                staged.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(src, str(staged))
            (changed if rel in have else added).append(rel)
            todo.append(rel)
        # Everything is downloaded: only now touch dest, one rename per file.
        for rel in todo:
            final = dest / rel
            if final.is_dir():
                shutil.rmtree(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, final)
            copied += final.stat().st_size
        removed = sorted(set(have) - set(data))
        for rel in removed:
            (dest / rel).unlink()
        for d in sorted((p for p in dest.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            if not any(d.iterdir()):  # directories emptied by removals
                d.rmdir()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = sorted(data)
    return {"files": files, "added": added, "changed": changed, "removed": removed, "ignored": ignored,
            "bytes": sum((dest / f).stat().st_size for f in files), "copied_bytes": copied,
            "source": redact_url(source)}


__all__ = ["DATA_SUFFIXES", "is_url", "snapshot"]
