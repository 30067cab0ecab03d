"""Crash safety through the real CLI: `kill -9` of `qlora-ops run` inside training, merge and
registration, two runs in one workspace, a disk that fills while the merged model is saved.

One workspace (temp git + DVC, tiny random Llama, the default local MLflow store and the CLI's own
temporary Prefect server, as a plain `qlora-ops run` on a laptop), runs in sequence; each kill lands at
a seeded random offset after the stage's start line, and is checked afterwards (the stage's done line
is absent). Before each kill the CLI's process tree is collected (psutil); every pid must be gone
within seconds after. After every rerun the registry must hold exactly the versions it should, each
complete (status=ready, tags, artifacts) or marked abandoned, and the champion must have passed its gates.
"""
from __future__ import annotations

import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import make_workspace

pytestmark = pytest.mark.slow

RNG = random.Random(20261201)  # the kill offsets: random, and the same on every run of the suite
MODEL = "crash-tiny"


def write_params(ws: Path, name: str, model_dir: Path, wait_s: float) -> str:
    p = {"model": {"source": str(model_dir), "max_seq_len": 96},
         "data": {"prepared": "data/prepared/crash"},
         "training": {"max_steps": 6, "batch_size": 8, "eval_every": 2, "save_every": 2, "threads": 1,
                      "warmup_steps": 1},
         "eval": {"batch_size": 8, "max_new_tokens": 4, "max_examples": 16},
         "gates": {"min_gain_over_base": -1.0, "min_retention_vs_lora": 0.0, "max_merge_disagreement": 1.0},
         "registry": {"experiment": "exp-crash", "model_name": MODEL},
         "orchestration": {"timeouts": {"workspace": wait_s}}}
    rel = f"params/{name}.yaml"
    (ws / rel).write_text(yaml.safe_dump(p))
    return rel


STARTED: list["Run"] = []


@pytest.fixture(autouse=True)
def stop_what_a_test_started():
    """A failed assertion must not leave a run (or, when the code under test is broken, its orphaned
    server) behind: SIGKILL every process tree a test started that is still there."""
    yield
    while STARTED:
        run = STARTED.pop()
        if run.proc.poll() is None:
            procs = run.tree()
            for q in procs:
                try:
                    q.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(procs, timeout=10)
        for q in run.seen:  # children seen before a kill, orphaned if the code under test is broken
            try:
                q.kill()
            except psutil.NoSuchProcess:
                pass
        run.proc.wait()
        run.fh.close()


class Run:
    """`qlora-ops run` as a real subprocess (python -m qlora_ops.flows.cli), stdout + stderr into a file."""

    def __init__(self, ws: Path, params: str, *extra: str, tag: str, preexec=None, children: bool = False):
        drop = ("PREFECT_", "QLORA_OPS_", "MLFLOW_", "TRANSFORMERS_", "PYTHONWARNINGS", "HF_HUB_DISABLE")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        env.update(PYTHONPATH=str(ws), PYTHONUNBUFFERED="1", PREFECT_HOME=str(ws.parent / "prefect-home"),
                   PREFECT_SERVER_ANALYTICS_ENABLED="false")
        if children:  # the stages and the training in children, as a user's run has them (tasks.core.child)
            env["QLORA_STAGES_IN_PROCESS"] = "0"
        self.log = ws.parent / f"{tag}.txt"
        self.fh = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "qlora_ops.flows.cli", "run", "--params", params, *extra,
                                      "--workspace", str(ws)], cwd=ws, env=env, stdout=self.fh, stderr=subprocess.STDOUT,
                                     preexec_fn=preexec)
        self.pid = self.proc.pid
        self.seen: list[psutil.Process] = []  # psutil checks create time: a reused pid is never hit
        STARTED.append(self)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 300) -> float:
        """Block until a line matches `pattern`; the time it was seen."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if re.search(pattern, self.text(), re.M):
                return time.time()
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {pattern!r}:\n{self.text()[-3000:]}"
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.text()[-3000:]}")

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        rc = self.proc.wait(timeout=timeout)
        self.fh.close()
        return rc, self.text()

    def tree(self) -> list[psutil.Process]:
        p = psutil.Process(self.pid)
        procs = [p, *p.children(recursive=True)]
        self.seen += procs[1:]
        return procs

    def kill_9(self) -> list[int]:
        """SIGKILL the CLI (no handler runs); the pids of its tree that are still alive 10 s later."""
        procs = self.tree()
        assert len(procs) > 1, "the run had no child (its temporary Prefect server) to check"
        os.kill(self.pid, signal.SIGKILL)
        self.finish()
        _, alive = psutil.wait_procs(procs, timeout=10)
        return [p.pid for p in alive if _status(p) != psutil.STATUS_ZOMBIE]


def _status(p: psutil.Process) -> str:
    try:
        return p.status()
    except psutil.NoSuchProcess:
        return psutil.STATUS_ZOMBIE


def kill_inside(run: Run, stage: str, max_offset: float) -> None:
    """Kill -9 `run` a seeded random offset after its `stage ...` line; the stage must not have ended."""
    started = run.wait_for(rf"^\d\d:\d\d:\d\d {stage} \.\.\.$")
    time.sleep(max(0.0, started + RNG.uniform(0, max_offset) - time.time()))
    assert run.kill_9() == [], "orphaned processes after kill -9"
    assert not re.search(rf"^\d\d:\d\d:\d\d {stage} (done|failed)", run.text(), re.M), \
        f"{stage} had ended before the kill:\n{run.text()[-2000:]}"


def registry(ws: Path) -> dict[int, dict]:
    """{version: {"tags": ..., "aliases": [...], "dir": artifact dir}} straight from the workspace's store."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{ws}/.qlora-ops/mlflow.db"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    out = {}
    for mv in c.search_model_versions(f"name = '{MODEL}'"):
        src = c.get_model_version_download_uri(MODEL, mv.version)
        aliases = c.get_model_version(MODEL, mv.version).aliases  # search results carry no aliases
        out[int(mv.version)] = {"tags": dict(mv.tags), "aliases": list(aliases or []),
                                "dir": Path(src.removeprefix("file://")), "run": c.get_run(mv.tags["mlflow_run_id"])}
    return out


def check_registry(ws: Path, ready: int, abandoned: int = 0) -> dict[int, dict]:
    """Exactly `ready` complete versions and `abandoned` abandoned ones; champion complete and gated."""
    reg = registry(ws)
    by = {s: [v for v, x in reg.items() if x["tags"].get("status") == s] for s in ("ready", "abandoned")}
    assert (len(by["ready"]), len(by["abandoned"]), len(reg)) == (ready, abandoned, ready + abandoned), reg
    for v in by["ready"]:
        t = reg[v]["tags"]
        assert {"fingerprint", "data_version", "score_key", "promoted", "promotion_reason", "test_accuracy"} <= set(t), t
        d = reg[v]["dir"]
        assert (d / "MLmodel").is_file() and list(d.rglob("*.safetensors")), f"v{v}: artifacts missing in {d}"
    champs = [v for v, x in reg.items() if "champion" in x["aliases"]]
    assert len(champs) == 1, reg
    ch = reg[champs[0]]
    assert ch["tags"]["status"] == "ready" and ch["tags"]["promoted"] == "true"
    assert ch["run"].data.tags.get("qlora_ops.gates") == "passed"
    for v in by["abandoned"]:
        assert "champion" not in reg[v]["aliases"] and "challenger" not in reg[v]["aliases"]
    return reg


def incomplete_versions(ws: Path, *, settled: bool = False) -> list[int]:
    """Versions tagged status=incomplete. While a run writes, a locked store reads as none yet. Once its
    writers are dead (`settled`), read it as the next writer will: a kill in mid-commit leaves a hot
    journal that a read-only connection cannot roll back ("attempt to write a readonly database"), so
    open it read-write, which rolls it back, and let any error fail the test."""
    q = "select version from model_version_tags where name = ? and key = 'status' and value = 'incomplete'"
    if settled:
        with sqlite3.connect(f"{ws}/.qlora-ops/mlflow.db", timeout=10) as db:
            return [int(r[0]) for r in db.execute(q, (MODEL,)).fetchall()]
    try:
        with sqlite3.connect(f"file:{ws}/.qlora-ops/mlflow.db?mode=ro", uri=True, timeout=0.05) as db:
            rows = db.execute(q, (MODEL,)).fetchall()
    except sqlite3.OperationalError:  # locked by the writer this instant, or no table yet
        return []
    return [int(r[0]) for r in rows]


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_dir):
    ws = make_workspace(tmp_path_factory.mktemp("crash") / "repo")
    write_params(ws, "crash", tiny_model_dir, wait_s=600)
    write_params(ws, "impatient", tiny_model_dir, wait_s=2)
    return ws


def test_kill_9_in_training_leaves_no_orphan_and_the_waiting_run_finishes(ws):
    holder = Run(ws, "params/crash.yaml", tag="holder", children=True)  # a training child to orphan, or not
    lock = ws / ".qlora-ops" / "run.lock"
    deadline = time.time() + 60
    while not (lock.is_file() and lock.read_text().startswith(f"{holder.pid} ")):
        assert time.time() < deadline and holder.proc.poll() is None, holder.text()
        time.sleep(0.05)
    waiter = Run(ws, "params/crash.yaml", tag="waiter")  # a scheduled run starting while the last one runs
    waiter.wait_for(rf"^waiting for run pid {holder.pid} ", timeout=60)
    # A third one with 2 s of patience refuses, naming the holder; no DVC lock traceback.
    rc, text = Run(ws, "params/impatient.yaml", tag="impatient").finish(timeout=120)
    assert rc == 4, text
    assert f"another qlora-ops run (pid {holder.pid})" in text and "Traceback" not in text, text

    kill_inside(holder, "train_qlora", max_offset=3.0)
    waiter.wait_for(r"^\d\d:\d\d:\d\d prepare \.\.\.$")  # it has the lock and its temporary server
    tree = waiter.tree()
    assert len(tree) > 1
    rc, text = waiter.finish()
    assert rc == 0, text[-4000:]
    assert f"registry: {MODEL} v1 registered" in text
    assert "Error logging to API" not in text  # its logs reached its server before the server stopped
    _, alive = psutil.wait_procs(tree, timeout=10)  # a normal exit stops its temporary server too
    assert [p.pid for p in alive if _status(p) != psutil.STATUS_ZOMBIE] == []
    check_registry(ws, ready=1)


def test_kill_9_in_merge_then_in_register_then_the_rerun_finishes(ws):
    """Merge: the half-written merged dir is never registered, and the next run merges again. Register,
    between version create and alias move: the version stays incomplete without an alias, and the rerun
    tags it abandoned (what `status` shows) and registers a complete one."""
    before = registry(ws)
    run = Run(ws, "params/crash.yaml", "--force", tag="merge-killed")
    kill_inside(run, "merge", max_offset=0.5)
    merge_run = re.search(r"^MLflow run (\w+) ", run.text(), re.M).group(1)
    assert registry(ws).keys() == before.keys()  # nothing registered by the killed run
    work = ws / ".qlora-ops" / "model-stage" / merge_run
    assert not (work / "merged").exists() or (work / "merged" / "qlora_ops_manifest.json").is_file()

    run = Run(ws, "params/crash.yaml", "--force", tag="register-killed")  # merges again, then is killed
    run.wait_for(r"^\d\d:\d\d:\d\d register \.\.\.$")
    deadline = time.time() + 120
    while not incomplete_versions(ws):  # the version exists, born status=incomplete
        assert time.time() < deadline and run.proc.poll() is None, run.text()[-3000:]
        time.sleep(0.005)
    time.sleep(RNG.uniform(0, 0.01))
    assert run.kill_9() == [], "orphaned processes after kill -9"
    assert re.search(r"^\d\d:\d\d:\d\d merge done in", run.text(), re.M)
    killed = incomplete_versions(ws, settled=True)
    assert len(killed) == 1, "the kill landed after the version was complete; nothing was tested"
    assert not registry(ws)[killed[0]]["aliases"]  # aliases move only after status=ready

    rc, text = Run(ws, "params/crash.yaml", "--force", tag="rerun").finish()
    assert rc == 0, text[-4000:]
    reg = check_registry(ws, ready=len(before) + 1, abandoned=1)
    assert all(x["tags"]["mlflow_run_id"] != merge_run for x in reg.values())
    assert reg[killed[0]]["tags"]["status"] == "abandoned"
    assert "abandoned" in reg[killed[0]]["tags"]["promotion_reason"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    st = subprocess.run([sys.executable, "-m", "qlora_ops.flows.cli", "status", "--params", "params/crash.yaml", "--workspace",
                         str(ws)], cwd=ws, env={**env, "PYTHONPATH": str(ws)}, capture_output=True, text=True, timeout=120)
    assert st.returncode == 0, st.stdout + st.stderr
    assert re.search(rf"^\s*{killed[0]}\b.*abandoned", st.stdout, re.M), st.stdout


@pytest.fixture
def small_disk(ws):
    """<state dir>/model-stage (where the merged model is written) on a 4 MiB tmpfs: the run fills it while
    saving the merged model (~16 MiB). Where mounting is not allowed, RLIMIT_FSIZE in the CLI process
    (SIGXFSZ ignored, so the write fails with EFBIG) just above every file the run writes before merging."""
    target = ws / ".qlora-ops" / "model-stage"
    target.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(target)], capture_output=True, text=True)
    if r.returncode == 0:
        try:
            yield target, None
        finally:
            subprocess.run(["umount", str(target)], check=True)
        return
    biggest = max(f.stat().st_size for d in (ws.parent / "prefect-home", ws / ".qlora-ops") for f in d.glob("*.db"))
    limit = biggest + (4 << 20)
    assert limit < 12 << 20, f"{biggest} bytes of databases: RLIMIT_FSIZE would stop them before the merge"

    def preexec():
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    yield target, preexec


def test_disk_full_while_saving_the_merged_model(ws, small_disk):
    target, preexec = small_disk
    before = registry(ws)
    rc, text = Run(ws, "params/crash.yaml", "--force", tag="disk-full", preexec=preexec).finish()
    assert rc == 5, text[-4000:]
    run_id = re.search(r"^MLflow run (\w+) ", text, re.M).group(1)
    merged = target / run_id / "merged"
    assert f"qlora-ops: disk full: no space left while writing {merged} (" in text, text[-3000:]
    assert "Traceback" not in text
    assert not merged.exists() and not (target / run_id / ".tmp-merged").exists()  # nothing half-written kept
    after = registry(ws)
    assert after.keys() == before.keys()  # nothing registered, no version points at a partial artifact
    assert [x["aliases"] for x in after.values()] == [x["aliases"] for x in before.values()]
