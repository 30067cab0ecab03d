"""`qlora-ops status / promote / rollback` on a real MLflow server, on versions the real flow registered."""
from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
import yaml

from tests.conftest import make_workspace, start_prefect_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, mlflow_server):
    root = tmp_path_factory.mktemp("ops")
    ws = make_workspace(root / "ws")
    name = f"ops-{uuid.uuid4().hex[:6]}"
    for f, lr in (("first", 5e-3), ("second", 2e-2)):
        p = {"model": {"source": str(tiny_model_dir), "max_seq_len": 96}, "data": {"prepared": f"data/prepared/ops-{f}"},
             "training": {"max_steps": 4, "batch_size": 8, "eval_every": 2, "save_every": 2, "threads": 1,
                          "warmup_steps": 1, "lr": lr},
             "eval": {"batch_size": 32, "max_new_tokens": 4, "max_examples": 24},
             "gates": {"min_gain_over_base": -1.0, "min_retention_vs_lora": 0.0, "max_merge_disagreement": 1.0},
             "registry": {"tracking_uri": mlflow_server, "experiment": name, "model_name": name}}
        (ws / "params" / f"{f}.yaml").write_text(yaml.safe_dump(p))
    with start_prefect_server(root / "prefect") as prefect:
        with prefect.settings():
            yield ws, name, prefect


def ops(ws, prefect, *args):
    env = prefect.client_env(PYTHONPATH=str(ws))
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "qlora_ops.flows.cli", *args, "--params", "params/first.yaml"], cwd=ws,
                          env=env, capture_output=True, text=True, timeout=300)


def test_status_promote_rollback(setup, mlflow_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    from qlora_ops.flows.retrain import retrain

    ws, name, prefect = setup
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert retrain(params_path="params/first.yaml", workspace=str(ws))["registry"]["version"] == 1
    s2 = retrain(params_path="params/second.yaml", workspace=str(ws))["registry"]
    c = MlflowClient(mlflow_server)
    # The policy keeps the champion unless the candidate is significantly better; v2 is the challenger.
    assert s2["version"] == 2 and not s2["promoted"] and "keep champion" in s2["reason"], s2
    assert c.get_model_version_by_alias(name, "challenger").version == "2"

    r = ops(ws, prefect, "status")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "champion    -> v1" in r.stdout and "challenger  -> v2" in r.stdout and "serving     -> (none)" in r.stdout
    assert "registered" in r.stdout and "recent runs" in r.stdout
    rows = {ln.split()[0]: ln.split()[1] for ln in r.stdout.splitlines() if ln.split()[:1] in (["1"], ["2"])}
    assert rows == {"1": "champion", "2": "challenger"}, r.stdout  # the aliases column of the versions table

    r = ops(ws, prefect, "promote", "2")  # same policy as automatic promotion: refused, with its numbers
    assert r.returncode == 1 and "not promoted" in r.stdout and "McNemar" in r.stdout, r.stdout + r.stderr
    r = ops(ws, prefect, "promote", "2", "--force")
    assert r.returncode == 1 and "--reason" in r.stderr
    r = ops(ws, prefect, "promote", "2", "--force", "--reason", "canary looked fine")
    assert r.returncode == 0, r.stdout + r.stderr
    v2 = c.get_model_version(name, "2").tags
    assert c.get_model_version_by_alias(name, "champion").version == "2"
    assert v2["forced_promotion_reason"] == "canary looked fine" and v2["forced_promotion_by"] and v2["previous_champion"] == "1"

    r = ops(ws, prefect, "rollback", "--reason", "bad answers in prod")
    assert r.returncode == 0, r.stdout + r.stderr
    assert c.get_model_version_by_alias(name, "champion").version == "1"
    assert c.get_model_version(name, "2").tags["status"] == "rejected"
    assert ops(ws, prefect, "promote", "2").returncode == 1  # a rejected version is never promoted again

    # An identical rerun of the rolled-back inputs changes nothing: skipped; forced, registered but not promoted.
    st = retrain(params_path="params/second.yaml", workspace=str(ws), return_state=True)
    assert st.name == "Skipped"
    s3 = retrain(params_path="params/second.yaml", workspace=str(ws), force=True)["registry"]
    assert s3["version"] == 3 and not s3["promoted"] and "rolled back" in s3["reason"]
    assert c.get_model_version_by_alias(name, "champion").version == "1"
