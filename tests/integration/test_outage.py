"""The tracking server goes away in the middle of a run: the real `qlora-ops run` (tiny random Llama, temp
git + DVC workspace, a real Prefect server: a shared tracking server's registry writers must hold the
slot on it, flows.registry_slot) against a real `mlflow server` that is killed (-9) as soon
as QLoRA training starts. The run must give up within a bounded time with exit 4 ("service
unavailable", one line naming the server, no traceback), register nothing and move no alias; once the
server is back on the same store, a plain rerun finishes the job (reusing the finished trainings) and
the registry holds exactly one complete version, the champion."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, make_workspace, start_prefect_server, wait_http

pytestmark = pytest.mark.slow


def start_mlflow(d: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port over a store in d; the same d and port bring the same server back."""
    log = open(d / "mlflow.log", "a")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{d}/mlflow.db", "--artifacts-destination",
                             str(d / "artifacts"), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=d, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/health", proc)
    return proc


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def cli(ws: Path, out: Path, prefect) -> subprocess.Popen:
    env = {k: v for k, v in prefect.client_env().items() if not k.startswith(("QLORA_OPS_", "MLFLOW_"))}
    env.update(PYTHONPATH=str(ws))
    return subprocess.Popen([sys.executable, "-m", "qlora_ops.flows.cli", "run", "--params", "params/tiny.yaml", "--workspace",
                             str(ws)], cwd=ws, env=env, stdout=open(out, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.fixture
def prefect(tmp_path):
    with start_prefect_server(tmp_path / "prefect-home") as server:
        yield server


def test_tracking_server_lost_mid_run_exits_4_then_a_rerun_finishes(tmp_path, tiny_model_dir, prefect):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlflow"
    store.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    ws = make_workspace(tmp_path / "repo")
    (ws / "params/tiny.yaml").write_text(yaml.safe_dump({
        "model": {"source": str(tiny_model_dir), "max_seq_len": 96},
        "data": {"prepared": "data/prepared/tiny"},
        "training": {"max_steps": 4, "batch_size": 8, "eval_every": 2, "save_every": 2, "threads": 1, "warmup_steps": 1},
        "eval": {"batch_size": 8, "max_new_tokens": 4, "max_examples": 16},
        "gates": {"min_gain_over_base": -1.0, "min_retention_vs_lora": 0.0, "max_merge_disagreement": 1.0},
        # one stage retry, short: the mid-run outage path is "retry with backoff, bounded, then exit 4"
        "orchestration": {"retries": 1, "retry_delay_s": 1},
        "registry": {"tracking_uri": uri, "experiment": "outage", "model_name": "outage-model"}}))

    server = start_mlflow(store, port)
    out1 = tmp_path / "run1.txt"
    run = cli(ws, out1, prefect)
    try:
        deadline = time.time() + 600
        while "train_qlora ..." not in out1.read_text(errors="replace"):
            assert run.poll() is None, out1.read_text(errors="replace")[-4000:]
            assert time.time() < deadline, "training never started"
            time.sleep(0.2)
        kill_group(server)  # the tracking server dies while the model stage runs
        t_kill = time.time()
        rc = run.wait(timeout=600)
        given_up_after = time.time() - t_kill
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        kill_group(server)
    text = out1.read_text(errors="replace")
    assert rc == 4, text[-4000:]
    lines = [l for l in text.splitlines() if l.startswith("qlora-ops: ")]
    assert len(lines) == 1 and lines[0].startswith("qlora-ops: service unavailable:") and f"127.0.0.1:{port}" in lines[0], lines
    assert "Traceback" not in text
    # bounded: the client's capped retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES set by the CLI) and one stage
    # retry, not MLflow's default minutes per call
    assert given_up_after < 300, given_up_after
    print(f"gave up {given_up_after:.1f} s after the tracking server died")

    server = start_mlflow(store, port)  # the server is back, on the same store
    try:
        c = MlflowClient(uri)
        assert c.search_model_versions("name = 'outage-model'") == [], "a version was registered by the failed run"
        out2 = tmp_path / "run2.txt"
        rerun = cli(ws, out2, prefect)
        assert rerun.wait(timeout=900) == 0, out2.read_text(errors="replace")[-4000:]
        text2 = out2.read_text(errors="replace")
        assert "registry: outage-model v1 registered" in text2, text2[-3000:]
        versions = c.search_model_versions("name = 'outage-model'")
        assert [v.version for v in versions] == ["1"]
        v = c.get_model_version("outage-model", "1")
        assert v.tags["status"] == "ready" and v.tags["mlflow_run_id"]
        assert c.get_model_version_by_alias("outage-model", "champion").version == "1"
        # the artifacts of the registered version are on the server's store, complete enough to load
        logged = {a.path for a in c.list_artifacts(v.tags["mlflow_run_id"])}
        assert {"model_stage.json", "gates.json", "summary.json"} <= logged, logged
    finally:
        kill_group(server)
