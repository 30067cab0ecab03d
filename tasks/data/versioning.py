"""Data and code versions: snapshot new data, run the DVC `prepare` stage, push to the remote, read dvc.lock.

Each params file gets its own DVC stage, so `dvc.yaml` stays the pipeline of record: the default
file uses the committed `prepare` stage; another file gets `prepare-<stem>`, added once with
`dvc stage add`. Your own raw data is `dvc add`-ed (re-adding records a new version when it changed).
With `data.source` set, each run first mirrors the source (a directory, a file, s3://bucket/prefix/)
into the `data.raw` directory (tasks.data.sources.snapshot), so a new drop is a new `.dvc` md5: a new data
version. Every run then pushes the stage and its upstream data to the DVC remote `qlora-ops`
(storage.dvc_remote, default <state_dir>/dvc-remote), so `dvc pull` with the DVC files logged on a
run's MLflow record fetches the exact data of that version anywhere.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import yaml

from qlora_ops.tasks.core.config import Params, ParamsError
from qlora_ops.tasks.data.readers import DATA_SUFFIXES
from qlora_ops.tasks.model.keys import data_version
from qlora_ops.tasks.core.paths import state_dir, ws_path
from qlora_ops.tasks.core.secrets import redact_url
from qlora_ops.tasks.data.sources import is_network_error, is_url, snapshot
from qlora_ops.tasks.data import quarantine
from qlora_ops.tasks.data import lineage
from qlora_ops.tasks.core.util import child_preexec
from qlora_ops.tasks.data import workspace_file

SAMPLE_RAW = "data/raw/stdlib_docstrings.jsonl"  # produced by the `sample` stage of dvc.yaml
# Every built-in sample (tasks/data/samples.py) -> its task: a dvc.yaml stage builds each, so none is `dvc add`-ed.
SAMPLES = {SAMPLE_RAW: "docstrings", "data/raw/stdlib_summaries.jsonl": "free-text"}
DEFAULT_PARAMS = "params/default.yaml"
REMOTE = "qlora-ops"  # the DVC remote every run pushes to, configured in .dvc/config.local

__all__ = ["DvcError", "REMOTE", "configure_remote", "dvc", "ensure_stage", "prepare_via_dvc", "remote_url",
           "stage_name"]


class DvcError(RuntimeError):
    pass


def _env() -> dict:
    # DVC stage commands say `python`: make that the interpreter running us (the venv's).
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def dvc(workspace: Path, *args: str) -> str:

    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=workspace, env=_env(), capture_output=True, text=True,
                       preexec_fn=child_preexec())
    if r.returncode != 0:
        # Redacted: the text may hold the remote URL (user:password@) and is logged by the flow.
        raise DvcError(redact_url(f"`dvc {' '.join(args)}` failed in {workspace}:\n{(r.stdout + r.stderr).strip()}"))
    return r.stdout


def stage_name(params_rel: str) -> str:
    return "prepare" if params_rel == DEFAULT_PARAMS else f"prepare-{Path(params_rel).stem}"


def _rel(workspace: Path, path: Path, what: str) -> str:
    try:
        return Path(os.path.relpath(path.resolve(), workspace.resolve())).as_posix()
    except ValueError:
        raise ParamsError(f"{path}: {what} must be inside the workspace {workspace} for DVC to track it") from None


# ---------------------------------------------------------------- the DVC remote
def remote_url(workspace: Path, params: Params) -> str:
    """storage.dvc_remote as DVC gets it: a URL as written, a directory as an absolute path
    (null = <state_dir>/dvc-remote, the embedded default)."""
    url = params.storage.dvc_remote
    if url and is_url(url):
        return url
    path = ws_path(workspace, url.removeprefix("file://")) if url else state_dir(workspace, params) / "dvc-remote"
    return str(Path(path).resolve())


def _local_config(workspace: Path) -> dict:
    from configobj import ConfigObj  # DVC's own config parser

    f = workspace / ".dvc" / "config.local"
    if not f.is_file():
        return {}
    try:
        return ConfigObj(str(f), list_values=False).dict()
    except Exception:  # unreadable: rewrite our part of it
        return {}


def configure_remote(workspace: Path, params: Params) -> str:
    """Make `qlora-ops` (storage.dvc_remote + storage.dvc_remote_options) the default DVC remote of the
    workspace, in .dvc/config.local (per machine, never committed: it may hold endpoints of one site).
    Touches nothing when it is already so (no DVC process then). Returns the URL, unredacted."""
    workspace = Path(workspace).resolve()
    url = remote_url(workspace, params)
    if not is_url(url):
        Path(url).mkdir(parents=True, exist_ok=True)
    cfg = _local_config(workspace)
    have = cfg.get(f'remote "{REMOTE}"') or {}
    want = dict(params.storage.dvc_remote_options)
    if have.get("url") != url:
        # -f replaces an older `qlora-ops` remote (another URL) with its options; -d makes it the default.
        dvc(workspace, "remote", "add", "--local", "-f", "-d", REMOTE, url)
        todo = want
    else:
        if (cfg.get("core") or {}).get("remote") != REMOTE:
            dvc(workspace, "remote", "default", "--local", REMOTE)
        todo = {k: v for k, v in want.items() if str(have.get(k)) != v}
    for key, value in todo.items():
        try:
            dvc(workspace, "remote", "modify", "--local", REMOTE, key, value)
        except DvcError as e:
            # The value is not shown: an option may be a credential.
            raise ParamsError(f"storage.dvc_remote_options.{key}: DVC refused this option for the remote "
                              f"{redact_url(url)} ({str(e).splitlines()[-1]}); fix or remove it (see "
                              "https://dvc.org/doc/command-reference/remote/modify for the options of each "
                              "remote type; credentials belong in the environment)") from None
    return url


# ---------------------------------------------------------------- stages
def _raw_for_source(workspace: Path, params_path: Path, params: Params) -> Path:
    """data.raw checked as the target of a data.source snapshot: a directory inside the workspace."""
    raw = params.data.raw
    rel = _rel(workspace, ws_path(workspace, raw), "data.raw")
    if rel in SAMPLES:
        raise ParamsError(f"{params_path}: data.source is set but data.raw is a built-in sample ({raw}); set "
                          "data.raw to the directory the source is snapshotted into, e.g. data/raw/my-domain")
    if rel.lower().endswith(DATA_SUFFIXES):
        raise ParamsError(f"{params_path}: data.raw={raw!r} looks like a file, but with data.source set it is the "
                          f"directory the source is snapshotted into; set data.raw to e.g. "
                          f"{Path(raw).with_suffix('').as_posix()!r}")
    if rel.startswith("../") or rel == ".":
        raise ParamsError(f"{params_path}: data.raw={raw!r} must be a directory inside the workspace {workspace} "
                          "(DVC tracks it), e.g. data/raw/my-domain")
    return ws_path(workspace, rel)


def _raw_dvc_file(workspace: Path, params: Params) -> str | None:
    rel = _rel(workspace, ws_path(workspace, params.data.raw), "data.raw")
    return None if rel in SAMPLES else f"{rel}.dvc"


LEGACY_DEPS = ("tasks/data.py", "tasks/config.py")  # a prepare stage's code deps before the stage packages


def _dvc_stages(workspace: Path) -> dict:
    f = workspace / "dvc.yaml"
    return (yaml.safe_load(f.read_text()) or {}).get("stages", {}) if f.is_file() else {}


def check_prepared_dir(workspace: Path, params_path: Path, params: Params) -> None:
    """data.prepared must be this params file's own directory. A copied params file keeps the original's, and
    DVC then refuses the new stage with "output ... is already specified in stage ..." (exit 2 without a
    word of which file or key): say it in our words, naming both params files and the key to change."""
    workspace = Path(workspace).resolve()
    prel = _rel(workspace, ws_path(workspace, params_path), "the params file")
    out = _rel(workspace, ws_path(workspace, params.data.prepared), "data.prepared")
    mine = stage_name(prel)
    for name, stage in _dvc_stages(workspace).items():
        if name == mine:
            continue
        for o in stage.get("outs") or []:
            o = Path(next(iter(o)) if isinstance(o, dict) else str(o)).as_posix()
            if o == out or o.startswith(out + "/") or out.startswith(o + "/"):  # DVC refuses nested outputs too
                m = re.search(r"--params\s+(\S+)", str(stage.get("cmd", "")))
                owner = f" of {m[1]}" if m else ""
                raise ParamsError(
                    f"{prel}: data.prepared={params.data.prepared!r} is already the output of DVC stage {name!r}{owner} "
                    f"(dvc.yaml: {o}); each params file needs its own prepared directory. Fix: set data.prepared in "
                    f"{prel} to a new one, e.g. `data.prepared: data/prepared/{Path(prel).stem}`")


def ensure_stage(workspace: Path, params_path: Path, params: Params) -> str:
    if not (workspace / ".dvc").is_dir():
        raise DvcError(f"{workspace} is not a DVC repository: run `git init && dvc init` there (a clone of qlora-ops already is one)")
    prel = _rel(workspace, params_path, "the params file")
    if prel.startswith("../"):
        raise ParamsError(f"{params_path}: the params file must be inside the workspace {workspace} (DVC tracks it); copy it into params/")
    raw_rel = _rel(workspace, ws_path(workspace, params.data.raw), "data.raw")
    out_rel = _rel(workspace, ws_path(workspace, params.data.prepared), "data.prepared")
    check_prepared_dir(workspace, params_path, params)  # before any DVC command: a copied file's data.prepared
    if raw_rel not in SAMPLES:
        if raw_rel.startswith("../"):
            raise ParamsError(f"{params_path}: data.raw={params.data.raw!r} is outside the workspace {workspace}; "
                              "DVC tracks it, so copy it under data/raw/ and point data.raw there")
        if not ws_path(workspace, raw_rel).exists():
            raise ParamsError(f"{params_path}: data.raw={params.data.raw!r} does not exist; point it at an alpaca-style "
                              "JSONL (or CSV/Parquet) file or a directory of them, or set data.source")
        dvc(workspace, "add", raw_rel)  # version the user's raw data (a no-op when unchanged)
    name = stage_name(prel)
    stage = _dvc_stages(workspace).get(name)
    # A stage written before the stage packages runs `python -m tasks.data` and depends on tasks/data.py and
    # tasks/config.py, which no longer exist: DVC would refuse it. Rewritten once, with the same outputs.
    # A workspace outside the clone has no tasks/ files: its stages depend on qlora-ops.yaml (workspace_file).
    deps = workspace_file.stage_deps(workspace)
    stale = LEGACY_DEPS + (() if deps == workspace_file.CLONE_DEPS else workspace_file.CLONE_DEPS)
    legacy = stage is not None and any(d in stale for d in stage.get("deps") or ())
    # A stage written without the lineage copy as a plain output (none, or the `persist` output of the
    # release that kept the live file there, which turns DVC's run cache off): rewritten once.
    lin_rel = _rel(workspace, lineage.copy_path(workspace, params.data), "the test-set lineage copy")
    legacy = legacy or (stage is not None and lin_rel not in (stage.get("outs") or ()))
    if stage is None or legacy:
        # DVC fails on a params key absent from the file; keys left to their defaults are covered by
        # the dependency on tasks/core/config.py, where the defaults live (in a workspace: its data_code).
        present = [k for k in ("data", "seed") if k in (yaml.safe_load(params_path.read_text()) or {})]
        p_args = ["-p", f"{prel}:{','.join(present)}"] if present else []
        dvc(workspace, "stage", "add", *(["--force"] if legacy else []), "-n", name,
            *[a for d in deps for a in ("-d", d)], "-d", raw_rel,
            *p_args, "-o", out_rel, "-o", lin_rel,
            f"python -m qlora_ops.tasks.data prepare --params {prel}")
    return name


@contextlib.contextmanager
def _workspace_lock(workspace: Path) -> Iterator[None]:
    # Two runs in one checkout (two deployments on one worker) take turns: DVC itself would fail the
    # second one on its repo lock, and two snapshots into one directory would interleave.
    d = workspace / ".dvc" / "tmp"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "qlora-ops-prepare.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pushed(out: str) -> int:
    m = re.search(r"(\d+) files? pushed", out)
    return int(m.group(1)) if m else 0


def prepare_via_dvc(workspace: Path, params_path: Path, params: Params) -> dict:
    """Snapshot data.source (when set) and `dvc add` it, `dvc repro` the params file's prepare stage, push
    it with its upstream data to the DVC remote; return the data version read from dvc.lock.

    Keys: stage, deps, outs, data_version, prepared_dir, reran, dvc_output; remote (URL, redacted),
    pushed (files pushed this call), source (the snapshot summary, or None), dvc_files (workspace-relative
    DVC files that pin this data: dvc.yaml, dvc.lock, the raw .dvc file if any, the params file)."""
    workspace = Path(workspace).resolve()
    params_path = ws_path(workspace, params_path)
    if not (workspace / ".dvc").is_dir():
        raise DvcError(f"{workspace} is not a DVC repository: run `git init && dvc init` there (a clone of qlora-ops already is one)")
    with _workspace_lock(workspace):
        url = configure_remote(workspace, params)  # first: a bad remote fails before any work
        summary = None
        if params.data.source:
            raw = _raw_for_source(workspace, params_path, params)
            src = params.data.source
            if not is_url(src):
                src = str(ws_path(workspace, src.removeprefix("file://")))
            try:
                summary = snapshot(src, raw, params.data.source_options)
            except ParamsError as e:
                raise ParamsError(f"{params_path}: {e}") from None
            # before `dvc add` / `dvc repro`: a bad new drop is quarantined, a failed prepare deletes nothing
            summary = quarantine.validated(workspace, params, raw, src, summary)
        else:
            quarantine.check_raw(workspace, params)
        if not workspace_file.is_source_tree(workspace):
            workspace_file.write_marker(workspace)  # this qlora-ops's data code: DVC re-runs the stages if it changed
        lineage.adopt(workspace, params)  # an upgraded workspace's lineage, before a rewritten stage drops it
        name = ensure_stage(workspace, params_path, params)
        out = dvc(workspace, "repro", name)
        live = lineage.lineage_path(workspace, params)
        if lineage.adopt(workspace, params) is None and live.is_file():
            # The run cache restores what these inputs gave last time; after `data new-lineage` they must be
            # split again under the new lineage, and DVC cannot see the state dir.
            made = json.loads((ws_path(workspace, params.data.prepared) / "stats.json").read_text()).get("lineage")
            if made != lineage.load(live)["lineage"]:
                out = dvc(workspace, "repro", "--force", name)
        # --with-deps: the stage's outputs and everything upstream (the sample stage's output, or the
        # `dvc add`-ed raw directory): the remote then holds both ends of this data version.
        try:
            push = dvc(workspace, "push", "--with-deps", name)
        except DvcError as e:
            if not is_network_error(e):
                raise
            # Transient (the flow retries it); nothing is lost: the next push sends whatever is missing.
            raise ConnectionError(f"DVC remote {redact_url(url)} could not be reached while pushing stage {name}; "
                                  "the data is versioned in the workspace and the next run pushes it; check the "
                                  f"network and storage.dvc_remote / storage.dvc_remote_options:\n{e}") from None
        lock = yaml.safe_load((workspace / "dvc.lock").read_text())["stages"]
    st = lock[name]
    deps = {d["path"]: d.get("md5") for d in st.get("deps", [])}
    outs = {o["path"]: o.get("md5") for o in st.get("outs", [])}
    # The lineage file (a persistent output) only grows; the version is what models train and test on, so
    # data restored to an earlier state is that state's version again.
    version = data_version({k: v for k, v in outs.items() if not k.endswith(".lineage.json")})
    files = ["dvc.yaml", "dvc.lock"]
    if (raw_dvc := _raw_dvc_file(workspace, params)) and (workspace / raw_dvc).is_file():
        files.append(raw_dvc)
    files.append(_rel(workspace, params_path, "the params file"))
    return {"stage": name, "deps": deps, "outs": outs, "data_version": version,
            "prepared_dir": str(ws_path(workspace, params.data.prepared)),
            "reran": "Running stage" in out, "dvc_output": (out.strip() + "\n" + push.strip()).strip()[-2000:],
            "remote": redact_url(url), "pushed": _pushed(push), "source": summary, "dvc_files": files}
