"""A stand-in for the GPU stage (flow name `qlora-model-stage`, the model stage's signature) that a real
Prefect worker runs in tests/integration/test_worker_crash.py. `data_uri` is a scratch directory whose
markers say what this run does:

- `hang`: write its pid to `hang.pid` and never finish (a stage that outlives its timeout);
- else, without `crashed-once`: create it and die the way a lost GPU worker's flow run does (SIGKILL: no
  state reported, the worker marks it Crashed);
- else: write the small result the parent reads from the MLflow run, as the real stage does."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from prefect import flow


@flow(name="qlora-model-stage", persist_result=False)
def model_stage(params: dict, run_id: str, data_uri: str, test_hash: str, workspace: str = ".") -> dict:
    from mlflow.tracking import MlflowClient

    scratch = Path(data_uri)
    if (scratch / "hang").exists():
        (scratch / "hang.pid").write_text(str(os.getpid()))
        while True:
            time.sleep(1)
    marker = scratch / "crashed-once"
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    result = {"attempt_pid": os.getpid(), "test_hash": test_hash}
    MlflowClient().log_text(run_id, json.dumps(result), "model_stage.json")
    return result
