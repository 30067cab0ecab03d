"""The exact prepared data of a DVC directory hash (`<md5>.dir`, what a run records as `dvc.out.<path>`),
fetched from the workspace's DVC cache or remote and checked file by file.

    manifest = fetch_dir(workspace, params, "d55c...c8.dir", Path("out"))   # [{relpath, md5}], out/ written
    problems = mismatches(Path("out"), manifest)                           # [] when every byte matches

How: DVC fetches by .dvc file, so a temporary one naming only that hash (`outs: [{md5, hash: md5, path}]`)
is written in a fresh folder at the workspace root and `dvc pull`-ed with the helper the runs use
(versioning.dvc): DVC takes it from its cache, else from the remote the runs push to. The folder is not
under the state dir because .dvcignore hides that from DVC; it is removed afterwards. DVC does not check
what it copies (a changed remote object is delivered as is), hence the checks here: the `.dir` manifest
must hash to its own name, and every file to its manifest entry.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import yaml

from qlora_ops.tasks.core.config import Params
from qlora_ops.tasks.core.util import md5_file
from qlora_ops.tasks.data.prepare import DataError
from qlora_ops.tasks.data.sources import is_network_error
from qlora_ops.tasks.data.versioning import DvcError, _workspace_lock, configure_remote, dvc


def _manifest(workspace: Path, md5: str) -> list[dict]:
    """The `.dir` object in the workspace's DVC cache (DVC 3 layout: files/md5/ab/cdef...dir), verified."""
    cache = Path(dvc(workspace, "cache", "dir").strip())
    f = cache / "files" / "md5" / md5[:2] / md5[2:]
    if not f.is_file():
        raise DataError(f"DVC directory object {md5} is not in the cache {cache} after `dvc pull`")
    if md5_file(f) != md5.removesuffix(".dir"):  # DVC names it by the md5 of these very bytes
        raise DataError(f"DVC directory object {md5} in {cache} does not match its hash: the cache or the remote "
                        "was changed")
    return json.loads(f.read_text())


def fetch_dir(workspace: Path, params: Params, md5: str, dst: Path) -> list[dict]:
    """Materialise the directory object `md5` in `dst` (must not exist yet: copies, never links into the
    cache) and return its manifest; nothing is checked against it here (see mismatches)."""
    if not md5.endswith(".dir"):
        raise DataError(f"{md5} is not a DVC directory hash (<md5>.dir)")
    workspace = Path(workspace).resolve()
    # The workspace lock: a run's `dvc repro` holds DVC's repo lock, which would fail this pull at once.
    with _workspace_lock(workspace):
        configure_remote(workspace, params)  # as a run does: the remote its data was pushed to
        tmp = Path(tempfile.mkdtemp(prefix=".qlora-ops-checkout-", dir=workspace))
        try:
            (tmp / "data.dvc").write_text(yaml.safe_dump({"outs": [{"md5": md5, "hash": "md5", "path": "data"}]}))
            try:
                dvc(workspace, "pull", (tmp / "data.dvc").relative_to(workspace).as_posix())
            except DvcError as e:
                if is_network_error(e):
                    raise ConnectionError(f"the DVC remote could not be reached while fetching {md5}:\n{e}") from None
                raise
            manifest = _manifest(workspace, md5)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(tmp / "data", dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def mismatches(root: Path, manifest: list[dict]) -> list[str]:
    """What in `root` differs from the manifest: a file missing, extra, or with other bytes (md5)."""
    want = {e["relpath"]: e["md5"] for e in manifest}
    have = {p.relative_to(root).as_posix(): p for p in sorted(Path(root).rglob("*")) if p.is_file()}
    out = [f"{rel}: missing" for rel in sorted(set(want) - set(have))]
    out += [f"{rel}: not in the DVC manifest" for rel in sorted(set(have) - set(want))]
    out += [f"{rel}: md5 {got} != {want[rel]} recorded by DVC" for rel in sorted(set(want) & set(have))
            if (got := md5_file(have[rel])) != want[rel]]
    return out
