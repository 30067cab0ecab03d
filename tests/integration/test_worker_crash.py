"""The GPU stage's flow run, from the parent's side (flows.remote_stage.remote_model_stage), on real parts:
a `prefect server`, a process work pool with one slot, a `prefect worker` process, a deployment of a
stand-in stage (tests/integration/_crash_stage_flow.py) from this checkout, and a local MLflow store both
sides share.

- A run that dies (SIGKILL: Prefect never retries a Crashed run by itself) is started again after the
  backoff, and the second run's result comes back.
- A run that outlives orchestration.timeouts.model_stage is cancelled: its process is stopped, its state
  is Cancelled, the worker's only slot is free for the next run.
- A dead GPU worker (the worker process and everything it started, SIGKILLed together, as when its
  container or node dies) leaves no one to report its run: the real `qlora-ops run` against deployments
  made by `qlora-ops deploy` sees the run Crashed by the heartbeat automation deploy installed, the stage
  restarts on the other worker, and exactly one version is registered."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import PREFECT_CLI, ROOT, make_workspace, start_prefect_server, stop_process_group, tail

pytestmark = pytest.mark.slow
POOL = "gpu-crash"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The server, the one-slot pool, the stand-in deployment and one worker; a local MLflow store."""
    root = tmp_path_factory.mktemp("worker-crash")
    uri = f"sqlite:///{root}/mlflow.db"
    with start_prefect_server(root / "prefect-home") as server:
        for args in (("work-pool", "create", POOL, "--type", "process"), ("work-pool", "set-concurrency-limit", POOL, "1")):
            r = server.cli(*args)
            assert r.returncode == 0, r.stdout + r.stderr
        with server.settings():
            from prefect import flow

            stand_in = flow.from_source(source=str(ROOT), entrypoint="tests/integration/_crash_stage_flow.py:model_stage")
            stand_in.to_deployment(name="crash-test", work_pool_name=POOL).apply()
        log = root / "worker.log"
        with open(log, "w") as fh:
            worker = subprocess.Popen([PREFECT_CLI, "worker", "start", "--pool", POOL, "--type", "process"],
                                      cwd=ROOT, env=server.client_env(PREFECT_WORKER_QUERY_SECONDS="1",
                                                                      MLFLOW_TRACKING_URI=uri),
                                      stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield {"server": server, "uri": uri, "root": root, "log": log}
        finally:
            stop_process_group(worker)


@pytest.fixture
def mlflow_run(stack, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack["uri"])  # the process-wide URI goes back after the test
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", stack["uri"])
    c = mlflow.MlflowClient()
    exp = c.get_experiment_by_name("crash") or c.get_experiment(
        c.create_experiment("crash", artifact_location=(stack["root"] / "artifacts").as_uri()))
    return c.create_run(exp.experiment_id).info.run_id


def params(**timeouts):
    from qlora_ops.tasks.core.config import Params

    return Params(orchestration={"gpu_pool": POOL, "deployment": "crash-test", "retries": 2, "retry_delay_s": 1,
                                 "timeouts": {"model_stage": 240, **timeouts}})


def call(stack, p, run_id, scratch):
    from qlora_ops.flows.remote_stage import remote_model_stage

    args = {"params": p.model_dump(mode="json"), "run_id": run_id, "data_uri": str(scratch), "test_hash": "abc"}
    with stack["server"].settings():
        try:
            return remote_model_stage(p, run_id, args)
        except Exception:
            print(tail(stack["log"]))
            raise


def runs_of(stack, run_id) -> list[tuple[str, str]]:
    from prefect.client.orchestration import get_client

    with stack["server"].settings(), get_client(sync_client=True) as c:
        return sorted((fr.name, fr.state.type.value) for fr in c.read_flow_runs() if run_id[:8] in fr.name)


@pytest.mark.timeout(400)
def test_a_crashed_model_stage_run_is_started_again(stack, mlflow_run, tmp_path):
    import mlflow

    out = call(stack, params(), mlflow_run, tmp_path)
    assert out["test_hash"] == "abc" and out["attempt_pid"] != int((tmp_path / "crashed-once").read_text())
    assert runs_of(stack, mlflow_run) == [(f"model-stage-{mlflow_run[:8]}-1", "CRASHED"),
                                         (f"model-stage-{mlflow_run[:8]}-2", "COMPLETED")]
    assert json.loads(mlflow.artifacts.load_text(f"runs:/{mlflow_run}/model_stage.json")) == out


@pytest.mark.timeout(500)
def test_a_timed_out_model_stage_run_is_cancelled_and_frees_the_worker(stack, mlflow_run, tmp_path):
    from qlora_ops.flows.faults import StageTimedOut

    (tmp_path / "hang").touch()
    with pytest.raises(StageTimedOut, match="orchestration.timeouts.model_stage.*cancelled it"):
        call(stack, params(model_stage=60), mlflow_run, tmp_path)
    assert runs_of(stack, mlflow_run) == [(f"model-stage-{mlflow_run[:8]}-1", "CANCELLED")]
    pid = int((tmp_path / "hang.pid").read_text())  # it was running, not still queued
    deadline = time.time() + 30
    while _alive(pid):
        assert time.time() < deadline, f"flow-run process {pid} still alive after cancellation\n{tail(stack['log'])}"
        time.sleep(0.5)
    # The pool's one slot is free again: the next run starts and completes.
    (tmp_path / "hang").unlink()
    (tmp_path / "crashed-once").touch()
    assert call(stack, params(), mlflow_run, tmp_path)["test_hash"] == "abc"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by the worker) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


HB = {"heartbeat_s": 30, "heartbeat_timeout_s": 60}  # Prefect's minimum heartbeat; two missed = dead


@pytest.mark.timeout(1500)
def test_a_dead_gpu_worker_is_seen_crashed_and_the_stage_restarts_on_the_other(stack, tmp_path, tiny_model_dir):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client

    server = stack["server"]
    ws = make_workspace(tmp_path / "checkout")
    (ws / "params" / "hb.yaml").write_text(yaml.safe_dump({
        "model": {"source": str(tiny_model_dir), "max_seq_len": 96},
        "data": {"prepared": "data/prepared/hb"},
        "training": {"max_steps": 4, "batch_size": 8, "eval_every": 2, "save_every": 2, "threads": 1, "warmup_steps": 1},
        "eval": {"batch_size": 32, "max_new_tokens": 4, "max_examples": 16},
        "gates": {"min_gain_over_base": -1.0, "min_retention_vs_lora": 0.0, "max_merge_disagreement": 1.0},
        "registry": {"experiment": "hb", "model_name": "hb-model"},
        "orchestration": {"pool": "cpu-hb", "gpu_pool": "gpu-hb", "deployment": "hb", "schedule": None,
                          "retries": 2, "retry_delay_s": 1, "gpu_required": False, **HB}}))
    base = {k: v for k, v in server.client_env().items() if not k.startswith(("MLFLOW_", "QLORA_OPS_"))}
    for pool in ("cpu-hb", "gpu-hb"):
        assert server.cli("work-pool", "create", pool, "--type", "process").returncode == 0
    r = subprocess.run([sys.executable, "-m", "qlora_ops.flows.cli", "deploy", "--params", "params/hb.yaml"], cwd=ws,
                       env={**base, "PYTHONPATH": str(ws)}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "automation: qlora-ops: crash hb runs without heartbeats" in r.stdout, r.stdout + r.stderr

    def worker(name: str):
        log = tmp_path / f"{name}.log"
        with open(log, "w") as fh:
            p = subprocess.Popen([PREFECT_CLI, "worker", "start", "--pool", "gpu-hb", "--type", "process", "--name", name],
                                 cwd=tmp_path, env={**base, "QLORA_OPS_HOME": str(ws), "PREFECT_WORKER_QUERY_SECONDS": "1"},
                                 stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        return p, log

    a, a_log = worker("gpu-a")
    b = None
    out = tmp_path / "run.txt"
    run = subprocess.Popen([sys.executable, "-m", "qlora_ops.flows.cli", "run", "--params", "params/hb.yaml"], cwd=ws,
                           env={**base, "PYTHONPATH": str(ws)}, stdout=open(out, "w"), stderr=subprocess.STDOUT,
                           start_new_session=True)
    try:
        deadline = time.time() + 900
        while "train_qlora ..." not in a_log.read_text(errors="replace"):  # the model stage is training on A
            assert run.poll() is None, out.read_text()[-4000:] + tail(a_log)
            assert time.time() < deadline, "training never started on worker A\n" + tail(a_log)
            time.sleep(0.5)
        b, b_log = worker("gpu-b")
        kill_tree(a)  # the worker, its flow run (Prefect starts it in a session of its own), the training
        killed = time.time()
        with server.settings(), get_client(sync_client=True) as c:  # seen Crashed within a bounded time
            dep = c.read_deployment_by_name("qlora-model-stage/hb")
            first = next(fr for fr in c.read_flow_runs() if fr.deployment_id == dep.id)
            while c.read_flow_run(first.id).state.type.value != "CRASHED":
                assert time.time() - killed < HB["heartbeat_timeout_s"] + 120, \
                    f"run still {c.read_flow_run(first.id).state.name} {time.time() - killed:.0f} s after its worker died"
                time.sleep(2)
        rc = run.wait(timeout=1200)
    finally:
        for p in (run, a, b):
            if p is not None:
                stop_process_group(p)
    text = out.read_text(errors="replace")
    assert rc == 0 and "registry: hb-model v1 registered" in text, text[-4000:] + "\n" + tail(b_log)

    with server.settings(), get_client(sync_client=True) as c:
        runs = sorted((fr for fr in c.read_flow_runs() if fr.deployment_id == dep.id), key=lambda fr: fr.name)
        assert [fr.state.type.value for fr in runs] == ["CRASHED", "COMPLETED"], [(fr.name, fr.state) for fr in runs]
        crashed = c.read_flow_run_states(runs[0].id)[-1]
    assert "missing heartbeats" in (crashed.message or ""), crashed  # the automation, not a worker, said so
    seen_after = crashed.timestamp.timestamp() - killed
    # The trigger fires heartbeat_timeout_s after the last heartbeat, which came before the kill: the bound
    # is that window plus the server's evaluation and a loaded machine's slack.
    assert seen_after < HB["heartbeat_timeout_s"] + 120, seen_after
    assert str(runs[1].id) in b_log.read_text(errors="replace")  # the restart ran on the other worker
    c = MlflowClient(f"sqlite:///{ws}/.qlora-ops/mlflow.db")
    assert [str(v.version) for v in c.search_model_versions("name = 'hb-model'")] == ["1"]
    print(f"Crashed {seen_after:.1f} s after the worker was killed")


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and every descendant at once, whatever session each is in: what a container or
    node death does (nobody is left to report a state)."""
    import psutil

    root = psutil.Process(proc.pid)
    procs = [root, *root.children(recursive=True)]
    assert len(procs) >= 2, procs  # the worker and its flow run (and the training, once started)
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(procs[1:], timeout=30)


@pytest.mark.timeout(300)
def test_a_run_left_pending_by_a_dead_worker_is_crashed_by_the_pending_automation(stack):
    """Issue 27, item 8: a worker that dies between taking a run (Pending) and starting its process sends no
    heartbeat, so the heartbeat automation never sees it. The automation `qlora-ops deploy` installs for that gap
    (flows/deploy.py crash_stuck_pending) marks it Crashed after orchestration.pending_timeout_s, and a Crashed
    model stage is started again by the parent (test_a_crashed_model_stage_run_is_started_again)."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Pending

    from qlora_ops.flows.deploy import crash_stuck_pending

    server, timeout_s = stack["server"], 15
    assert server.cli("work-pool", "create", "gpu-pending", "--type", "process").returncode == 0  # nobody polls it
    with server.settings():
        stand_in = flow.from_source(source=str(ROOT), entrypoint="tests/integration/_crash_stage_flow.py:model_stage")
        dep_id = stand_in.to_deployment(name="pending-test", work_pool_name="gpu-pending").apply()
        made = crash_stuck_pending("pending-test", [str(dep_id)], timeout_s)
        assert made.startswith("qlora-ops: crash pending-test runs stuck pending: ")
        with get_client(sync_client=True) as c:
            fr = c.create_flow_run_from_deployment(dep_id, parameters={"params": {}, "run_id": "x", "data_uri": ".", "test_hash": "x"})
            c.set_flow_run_state(fr.id, Pending(), force=True)  # taken by a worker that then died
            t0 = time.time()
            while (st := c.read_flow_run(fr.id).state).type.value != "CRASHED":
                assert st.type.value == "PENDING", st
                assert time.time() - t0 < timeout_s + 90, f"still {st.name} {time.time() - t0:.0f} s after Pending"
                time.sleep(1)
            crashed = c.read_flow_run_states(fr.id)[-1]
    seen = time.time() - t0
    assert f"Pending for {timeout_s} s" in (crashed.message or ""), crashed
    print(f"Crashed {seen:.1f} s after it turned Pending (pending_timeout_s {timeout_s})")
