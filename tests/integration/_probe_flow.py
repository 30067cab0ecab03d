"""A tiny flow that a Prefect worker runs from a deployment in tests/integration/test_prefect_deploy.py.

It exercises what the retraining deployment depends on, without training anything: the worker
changed into the deployment's source directory (the pull step), our package imports in the worker's
interpreter, a params file resolves relative to the `workspace` parameter, and the work pool's env
defaults reached the flow-run process. The record it writes is the side effect the test checks.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from qlora_ops.tasks.core.config import load_params
from qlora_ops.tasks.core.paths import ws_path


@flow(name="qlora-ops-probe", log_prints=True)
def probe(out_path: str, workspace: str = ".", params_path: str = "params/default.yaml",
          hold_seconds: float = 0.0) -> dict:
    started = time.time()
    ws = Path(workspace).resolve()
    params = load_params(ws_path(ws, params_path))
    # Held open so two runs of one deployment would overlap in time if nothing serialized them.
    time.sleep(hold_seconds)
    record = {
        "digest": params.digest(),
        "workspace": str(ws),
        "cwd": os.getcwd(),
        "python": sys.executable,
        "prefix": sys.prefix,
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE"),
        "flow_run_id": flow_run.get_id(),
        "started": started,
        "finished": time.time(),
    }
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out)  # the test polls for this file: never let it see half a record
    print(f"probe: digest {record['digest']} from {ws}")
    return record
