"""Two `qlora-ops run` from two workspaces (two machines, as far as the filesystem lock can tell) against one
MLflow registry and one Prefect API, started together. The fcntl lock cannot see across workspaces; the
registered model's Prefect global concurrency limit must serialize register + promote, so the second
decision sees the first's champion, and the champion is the one the promotion policy (tasks.gates.policy.decide on the
two versions' saved per-row results) picks: not simply the higher accuracy, which a tie would satisfy."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.conftest import make_workspace, start_prefect_server

pytestmark = pytest.mark.slow


def _params(model_dir, tracking_uri: str, lr: float) -> dict:
    return {
        "model": {"source": str(model_dir), "max_seq_len": 96},
        "data": {"prepared": "data/prepared/race"},
        "training": {"max_steps": 4, "batch_size": 8, "eval_every": 2, "save_every": 2, "threads": 1,
                     "warmup_steps": 1, "lr": lr},
        "eval": {"batch_size": 32, "max_new_tokens": 4, "max_examples": 24},
        "gates": {"min_gain_over_base": -1.0, "min_retention_vs_lora": 0.0, "max_merge_disagreement": 1.0},
        "registry": {"tracking_uri": tracking_uri, "experiment": "race", "model_name": "race-model"},
    }


def test_two_workspaces_never_both_take_the_empty_champion_slot(tmp_path, tiny_model_dir, mlflow_server):
    from mlflow.tracking import MlflowClient

    procs = []
    with start_prefect_server(tmp_path / "prefect") as prefect:
        for name, lr in (("a", 5e-3), ("b", 2e-2)):
            ws = make_workspace(tmp_path / f"ws-{name}")
            (ws / "params" / "race.yaml").write_text(yaml.safe_dump(_params(tiny_model_dir, mlflow_server, lr)))
            env = prefect.client_env(PYTHONPATH=str(ws))
            env.pop("MLFLOW_TRACKING_URI", None)
            procs.append(subprocess.Popen([sys.executable, "-m", "qlora_ops.flows.cli", "run", "--params", "params/race.yaml"],
                                          cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs = [p.communicate(timeout=900)[0] for p in procs]
        for p, out in zip(procs, outs):
            assert p.returncode == 0, out[-4000:]
        with prefect.settings():
            from prefect.client.orchestration import get_client
            with get_client(sync_client=True) as c:
                assert c.read_global_concurrency_limit_by_name("qlora-ops-registry-race-model").limit == 1

    c = MlflowClient(mlflow_server)
    versions = {int(v.version): v for v in c.search_model_versions("name = 'race-model'")}
    assert sorted(versions) == [1, 2]
    first, second = versions[1], versions[2]  # version numbers follow the order registration happened
    reasons = [v.tags["promotion_reason"] for v in (first, second)]
    assert reasons[0].startswith("first champion"), reasons
    # The second decision was taken after the first finished: it compared against v1, never saw an empty slot.
    assert "champion v1" in reasons[1] and not reasons[1].startswith("first champion"), reasons
    champ = int(c.get_model_version_by_alias("race-model", "champion").version)
    # The real policy, recomputed here from the per-row results each version's run saved: v2 holds the
    # champion iff decide() promotes it over v1, and the reason on v2 is that decision, numbers and all.
    import mlflow

    from qlora_ops.tasks.core.config import Params, RegistryParams
    from qlora_ops.tasks.registry.manual import version_rows
    from qlora_ops.tasks.gates.policy import PromotionPolicy, decide

    mlflow.set_tracking_uri(mlflow_server)
    (k1, r1), (k2, r2) = (version_rows("race-model", v, tmp_path / "rows") for v in (1, 2))
    assert k1 == k2 and r1["ids"] == r2["ids"]  # same score key, same rows: a paired comparison
    d = decide(PromotionPolicy.from_registry(RegistryParams()), r2["correct"], r1["correct"], seed=Params().seed,
               metric_name="exact_match")
    assert (champ == 2) == d["promote"], (d["reason"], champ)
    assert reasons[1].startswith(d["reason"]), (reasons[1], d["reason"])
    assert second.tags["promoted"] == str(d["promote"]).lower()
