"""A service that is down -- at start, or through every retry of a stage -- ends the run with exit 4
(service unavailable), one line naming it, no traceback; not exit 5 "internal error". The DVC remote is an
S3 endpoint where nothing listens: the real `qlora-ops run` versions the data, fails to push, names the
remote. A dead Prefect API is named by the preflight check in seconds, before any work."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import S3_ENV, free_port, make_workspace

pytestmark = pytest.mark.slow


def test_unreachable_dvc_remote_exits_4_naming_it(tmp_path):
    ws = make_workspace(tmp_path / "repo")
    dead = f"http://127.0.0.1:{free_port()}"
    (ws / "params" / "dead.yaml").write_text(yaml.safe_dump({
        "data": {"prepared": "data/prepared/dead"},
        "storage": {"dvc_remote": "s3://bucket/dvc", "dvc_remote_options": {"endpointurl": dead}},
        "orchestration": {"retries": 0},  # the retry path is tests/integration/test_retries.py; here: the end
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    env.update(S3_ENV, PYTHONPATH=str(ws), PREFECT_HOME=str(tmp_path / "prefect-home"))
    r = subprocess.run([sys.executable, "-m", "qlora_ops.flows.cli", "run", "--params", "params/dead.yaml", "--workspace", str(ws)],
                       cwd=ws, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 4, r.stdout[-2000:] + r.stderr[-3000:]
    lines = [l for l in r.stderr.splitlines() if l.startswith("qlora-ops: ")]
    assert len(lines) == 1 and lines[0].startswith("qlora-ops: service unavailable: DVC remote s3://bucket/dvc"), lines
    assert "Traceback" not in r.stdout + r.stderr


def test_dead_prefect_api_exits_4_in_seconds_naming_it(tmp_path):
    import time

    ws = make_workspace(tmp_path / "repo")
    dead = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    env.update(PYTHONPATH=str(ws), PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=dead)
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "qlora_ops.flows.cli", "run", "--workspace", str(ws)],
                       cwd=ws, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 4, r.stdout[-2000:] + r.stderr[-3000:]
    assert time.time() - t < 60  # the preflight probe, not the Prefect client's minutes of retries
    assert f"Prefect API at {dead}" in r.stderr and "Traceback" not in r.stdout + r.stderr
    assert not (ws / ".qlora-ops").exists()  # refused before any work
