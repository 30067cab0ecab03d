"""Data and code versions: run the DVC `prepare` stage for a params file and read what it locked.

Each params file gets its own DVC stage, so `dvc.yaml` stays the pipeline of record: the default
file uses the committed `prepare` stage; another file gets `prepare-<stem>`, added once with
`dvc stage add`. Your own raw data is `dvc add`-ed (re-adding records a new version when it changed).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tasks.config import Params, ParamsError
from tasks.paths import ws_path

SAMPLE_RAW = "data/raw/stdlib_docstrings.jsonl"  # produced by the `sample` stage of dvc.yaml
DEFAULT_PARAMS = "params/default.yaml"


class DvcError(RuntimeError):
    pass


def _env() -> dict:
    # DVC stage commands say `python`: make that the interpreter running us (the venv's).
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def dvc(workspace: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=workspace, env=_env(), capture_output=True, text=True)
    if r.returncode != 0:
        raise DvcError(f"`dvc {' '.join(args)}` failed in {workspace}:\n{(r.stdout + r.stderr).strip()}")
    return r.stdout


def stage_name(params_rel: str) -> str:
    return "prepare" if params_rel == DEFAULT_PARAMS else f"prepare-{Path(params_rel).stem}"


def _rel(workspace: Path, path: Path, what: str) -> str:
    try:
        return Path(os.path.relpath(path.resolve(), workspace.resolve())).as_posix()
    except ValueError:
        raise ParamsError(f"{path}: {what} must be inside the workspace {workspace} for DVC to track it") from None


def ensure_stage(workspace: Path, params_path: Path, params: Params) -> str:
    if not (workspace / ".dvc").is_dir():
        raise DvcError(f"{workspace} is not a DVC repository: run `git init && dvc init` there (a clone of qlora-ops already is one)")
    prel = _rel(workspace, params_path, "the params file")
    if prel.startswith("../"):
        raise ParamsError(f"{params_path}: the params file must be inside the workspace {workspace} (DVC tracks it); copy it into params/")
    raw_rel = _rel(workspace, ws_path(workspace, params.data.raw), "data.raw")
    out_rel = _rel(workspace, ws_path(workspace, params.data.prepared), "data.prepared")
    if raw_rel != SAMPLE_RAW:
        if not ws_path(workspace, raw_rel).is_file():
            raise ParamsError(f"{params_path}: data.raw={params.data.raw!r} does not exist; point it at an alpaca-style JSONL file")
        dvc(workspace, "add", raw_rel)  # version the user's raw data (a no-op when unchanged)
    name = stage_name(prel)
    stages = (yaml.safe_load((workspace / "dvc.yaml").read_text()) or {}).get("stages", {}) if (workspace / "dvc.yaml").is_file() else {}
    if name not in stages:
        # DVC fails on a params key absent from the file; keys left to their defaults are covered by
        # the dependency on tasks/config.py, where the defaults live.
        present = [k for k in ("data", "seed") if k in (yaml.safe_load(params_path.read_text()) or {})]
        p_args = ["-p", f"{prel}:{','.join(present)}"] if present else []
        dvc(workspace, "stage", "add", "-n", name, "-d", "tasks/data.py", "-d", "tasks/config.py", "-d", raw_rel,
            *p_args, "-o", out_rel, f"python -m tasks.data prepare --params {prel}")
    return name


def prepare_via_dvc(workspace: Path, params_path: Path, params: Params) -> dict:
    """`dvc repro` the params file's prepare stage; return the data version read from dvc.lock."""
    workspace = Path(workspace).resolve()
    name = ensure_stage(workspace, Path(params_path), params)
    out = dvc(workspace, "repro", name)
    lock = yaml.safe_load((workspace / "dvc.lock").read_text())["stages"]
    st = lock[name]
    deps = {d["path"]: d.get("md5") for d in st.get("deps", [])}
    outs = {o["path"]: o.get("md5") for o in st.get("outs", [])}
    version = hashlib.sha256(repr(sorted(outs.items())).encode()).hexdigest()[:12]
    return {"stage": name, "deps": deps, "outs": outs, "data_version": version,
            "prepared_dir": str(ws_path(workspace, params.data.prepared)),
            "reran": "Running stage" in out, "dvc_output": out.strip()[-2000:]}


def code_version() -> dict:
    """Git commit of the qlora-ops checkout (when there is one) plus a hash of the stage sources."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for p in sorted(list((root / "tasks").rglob("*.py")) + list((root / "flows").rglob("*.py"))):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    info = {"source_sha": h.hexdigest()[:16], "git_commit": None, "git_dirty": None}
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                            check=True).stdout.strip()
        info["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--", "tasks", "flows"], cwd=root,
                                                capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def source_hash(*files: str) -> str:
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in files:
        h.update((root / f).read_bytes())
    return h.hexdigest()[:16]
