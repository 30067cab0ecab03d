"""A GPU worker's flow run dies mid model stage (SIGKILL: Prefect never retries a Crashed run by itself).
The parent's hand-off (flows.retrain.remote_model_stage) must see Crashed, start the deployment again
after its backoff, and return the second run's result. Real parts: a `prefect server`, a process work
pool, a `prefect worker` process, a deployment of a stand-in stage (tests/integration/_crash_stage_flow.py)
from this checkout, and a local MLflow store both sides share."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import PREFECT_CLI, ROOT, start_prefect_server, stop_process_group, tail

pytestmark = pytest.mark.slow
POOL = "gpu-crash"


@pytest.mark.timeout(400)
def test_a_crashed_model_stage_run_is_started_again(tmp_path, monkeypatch):
    import mlflow
    from prefect import flow
    from prefect.client.orchestration import get_client

    from flows.retrain import remote_model_stage
    from tasks.config import Params

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the process-wide URI goes back after the test
    mlflow.set_tracking_uri(uri)
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", uri)
    run_id = mlflow.MlflowClient().create_run(mlflow.MlflowClient().create_experiment(
        "crash", artifact_location=(tmp_path / "artifacts").as_uri())).info.run_id
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    params = Params(orchestration={"gpu_pool": POOL, "deployment": "crash-test", "retries": 2, "retry_delay_s": 1,
                                   "timeouts": {"model_stage": 240}})

    with start_prefect_server(tmp_path / "prefect-home") as server:
        r = server.cli("work-pool", "create", POOL, "--type", "process")
        assert r.returncode == 0, r.stdout + r.stderr
        with server.settings():
            stand_in = flow.from_source(source=str(ROOT), entrypoint="tests/integration/_crash_stage_flow.py:model_stage")
            stand_in.to_deployment(name="crash-test", work_pool_name=POOL).apply()
        log = tmp_path / "worker.log"
        with open(log, "w") as fh:
            worker = subprocess.Popen([PREFECT_CLI, "worker", "start", "--pool", POOL, "--type", "process"],
                                      cwd=ROOT, env=server.client_env(PREFECT_WORKER_QUERY_SECONDS="1",
                                                                      MLFLOW_TRACKING_URI=uri),
                                      stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            with server.settings():
                out = remote_model_stage(params, run_id, {"params": params.model_dump(mode="json"), "run_id": run_id,
                                                          "data_uri": str(scratch), "test_hash": "abc"})
                with get_client(sync_client=True) as c:
                    runs = c.read_flow_runs()
                    states = sorted((fr.name, fr.state.type.value) for fr in runs)
        except Exception:
            print(tail(log))
            raise
        finally:
            stop_process_group(worker)

    assert out["test_hash"] == "abc" and out["attempt_pid"] != int((scratch / "crashed-once").read_text())
    assert states == [(f"model-stage-{run_id[:8]}-1", "CRASHED"), (f"model-stage-{run_id[:8]}-2", "COMPLETED")], states
    assert json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/model_stage.json")) == out
