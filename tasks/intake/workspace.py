"""A workspace of your own: a git + DVC folder with params/, dvc.yaml, your data and the run state (.qlora-ops/),
used by an installed qlora-ops. The qlora-ops clone is one too.

    init(Path("my-domain"))          # new folder, or adopt an existing git repository
    find_root(Path.cwd())            # like git and dvc: the nearest folder up that is a workspace
    upgrade_notes(root)              # before a run: what this qlora-ops changes against the last run's
    record_run(root, "Completed")    # after it: the qlora-ops version, lock hash and code that made it
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from qlora_ops.tasks.core import lockfile
from qlora_ops.tasks.data import workspace_file
from qlora_ops.tasks.data.versioning import SAMPLES
from qlora_ops.tasks.model.keys import code_hash, lib_versions

RECORD = ".qlora-ops/versions.jsonl"  # one line per run: what made it (beside run.lock, whatever state_dir says)
IGNORE = [".qlora-ops/", ".venv/", "__pycache__/", "/data/prepared", *(f"/{raw}" for raw in SAMPLES)]
DVCIGNORE = [".venv/", ".qlora-ops/"]
README = """# {name}

A qlora-ops workspace: your data, params files (params/) and DVC pipeline (dvc.yaml); models and runs land in
the MLflow store under .qlora-ops/ (or params' registry.tracking_uri).

    qlora-ops init data/raw/mine.jsonl        # writes params/mine.yaml for your data
    qlora-ops check --params params/mine.yaml # validates it and says what a run would do
    qlora-ops run --params params/mine.yaml   # the whole loop; `qlora-ops run` alone: the built-in sample
"""


def _is_workspace(d: Path) -> bool:
    # Made by `workspace init` (qlora-ops.yaml), or the clone and workspaces made before it: DVC + params/.
    return (d / workspace_file.MARKER).is_file() or ((d / ".dvc").is_dir() and (d / "params").is_dir())


def find_root(start: Path) -> Path | None:
    """The nearest folder from `start` up that is a workspace, or None."""
    start = Path(start).resolve()
    return next((d for d in (start, *start.parents) if _is_workspace(d)), None)


def qlora_ops_version() -> str:
    try:
        return version("qlora-ops")
    except PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------- init
def _dvc_yaml(params: list[str]) -> str:
    """dvc.yaml of a new workspace: the clone's sample and prepare stages, depending on qlora-ops.yaml."""
    dep = workspace_file.MARKER
    out = ["# The data pipeline of record (`qlora-ops run` runs it through `dvc repro`). Another params file gets",
           "# its own stage (prepare-<stem>), added by `qlora-ops run --params FILE`. The stages depend on",
           f"# {dep}, which names the qlora-ops data code they run.", "stages:"]
    for raw, task in SAMPLES.items():
        stem = "default" if task == "docstrings" else task
        if f"params/{stem}.yaml" not in params:
            continue
        sample = "sample" if stem == "default" else f"sample-{stem}"
        prep = "prepare" if stem == "default" else f"prepare-{stem}"
        out += [f"  {sample}:", f"    cmd: python -m qlora_ops.tasks.data sample --task {task} --out {raw}",
                f"    deps:\n      - {dep}", f"    outs:\n      - {raw}",
                f"  {prep}:", f"    cmd: python -m qlora_ops.tasks.data prepare --params params/{stem}.yaml",
                f"    deps:\n      - {dep}\n      - {raw}",
                f"    params:\n      - params/{stem}.yaml:\n          - data\n          - seed",
                # the versioned copy of the test-set lineage (tasks/data/lineage.py; the live file is in the state dir)
                f"    outs:\n      - data/prepared/{stem}\n      - data/prepared/{stem}.lineage.json"]
    return "\n".join(out) + "\n"


def _add_lines(f: Path, lines: list[str]) -> None:
    have = f.read_text().splitlines() if f.is_file() else []
    if todo := [x for x in lines if x not in have]:
        f.write_text("".join(x + "\n" for x in have + todo))


def _run(cwd: Path, *args: str) -> None:
    r = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"`{' '.join(args)}` failed in {cwd}: {(r.stdout + r.stderr).strip()}")


def init(d: Path) -> list[str]:
    """Make `d` a workspace, or adopt it (an existing git repository, DVC or not): nothing of yours is
    replaced, only what is missing is added. Returns what was done, one line each."""
    d = Path(d).resolve()
    d.mkdir(parents=True, exist_ok=True)
    done = []
    if not (d / ".git").exists():
        _run(d, "git", "init", "-q")
        done.append("git init")
    if not (d / ".dvc").is_dir():
        _run(d, sys.executable, "-m", "dvc", "init", "-q")
        with open(d / ".dvc" / "config", "a") as fh:  # as the clone's: no analytics, DVC stages nothing in git
            fh.write("[core]\n    analytics = false\n    autostage = false\n")
        done.append("dvc init (.dvc/config)")
    src = workspace_file.ROOT / "params"  # the clone's params/, or the installed package's qlora_ops/params/
    (d / "params").mkdir(exist_ok=True)
    copied = []
    for f in sorted(src.glob("*.yaml")):
        if not (d / "params" / f.name).exists():
            (d / "params" / f.name).write_bytes(f.read_bytes())
            copied.append(f"params/{f.name}")
    if copied:
        done.append("wrote " + ", ".join(copied))
    if not (d / "dvc.yaml").exists():
        (d / "dvc.yaml").write_text(_dvc_yaml(copied))
        done.append("wrote dvc.yaml (the sample and prepare stages)")
    if workspace_file.write_marker(d):
        done.append(f"wrote {workspace_file.MARKER} (the workspace marker)")
    _add_lines(d / ".gitignore", IGNORE)
    _add_lines(d / ".dvcignore", DVCIGNORE)
    if not (d / "README.md").exists():
        (d / "README.md").write_text(README.format(name=d.name))
        done.append("wrote README.md")
    return done


# ---------------------------------------------------------------- what made each run
def current() -> dict:
    return {"qlora_ops": qlora_ops_version(), "lock_hash": lockfile.lock_hash(workspace_file.ROOT),
            "decision_code": code_hash(), "data_code": workspace_file.data_code(), "libs": lib_versions()}


def last_run(root: Path) -> dict | None:
    f = Path(root) / RECORD
    lines = f.read_text().splitlines() if f.is_file() else []
    return json.loads(lines[-1]) if lines else None


def record_run(root: Path, outcome: str, params: str) -> None:
    f = Path(root) / RECORD
    f.parent.mkdir(parents=True, exist_ok=True)
    with open(f, "a") as fh:
        fh.write(json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "params": params,
                             "outcome": outcome, **current()}) + "\n")


def upgrade_notes(root: Path) -> list[str]:
    """What this qlora-ops changes against the one that made the workspace's last run, and whether the next
    run retrains because of it (the run fingerprint covers the deciding code, the lock and the libraries)."""
    last, now = last_run(root), current()
    if last is None or all(last.get(k) == now[k] for k in now):
        return []
    out = [f"qlora-ops {now['qlora_ops']} on a workspace last run by {last.get('qlora_ops')} ({last.get('at')}):"]
    why = []
    if last.get("decision_code") != now["decision_code"]:
        why.append("the code that decides the model or its verdict changed")
    if last.get("lock_hash") != now["lock_hash"]:
        why.append(f"the dependency lock changed ({last.get('lock_hash')} -> {now['lock_hash']})")
    libs = [f"{k} {v} -> {now['libs'].get(k)}" for k, v in (last.get("libs") or {}).items() if now["libs"].get(k) != v]
    if libs:
        why.append("libraries changed: " + ", ".join(libs))
    if last.get("data_code") != now["data_code"]:
        out.append("  the data preparation code changed: DVC re-runs the prepare stages (the data version moves "
                   "only if the prepared rows differ)")
    if why:
        out.append("  the next run RETRAINS (new fingerprint): " + "; ".join(why))
    else:
        out.append("  no retraining from the upgrade: the deciding code, the lock and the libraries are the same "
                   "(an unchanged workspace ends Skipped)")
    return out
