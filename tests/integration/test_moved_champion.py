"""The champion moves while a run's model stage runs (issue 17): the run's decision compares the candidate
with the new champion only on predictions scored where the candidate was (the same score key: its own
saved ones); otherwise it registers the candidate `deferred`, keeps the champion, says why, and the next
run on the same inputs decides (a deferred version is no decision). The real register step (Prefect task,
registry slot, file lock) on a local MLflow store; the model stage's result is written by hand."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow
N = 60  # rows: enough for the paired policy to promote a clearly better candidate


def rows(correct: bool) -> dict:
    return {"ids": [f"t{i}" for i in range(N)], "correct": [correct] * N, "answers": ["a" if correct else "b"] * N}


def saved_eval(c, run_id: str, correct: bool) -> None:
    """The merged model's saved predictions on the run, as the model stage logs them (eval/merged)."""
    preds = "".join(json.dumps({"id": f"t{i}", "reference": "a", "prediction": "a" if correct else "b",
                                "correct": correct}) + "\n" for i in range(N))
    c.log_text(run_id, preds, "eval/merged/predictions.jsonl")
    c.log_text(run_id, json.dumps({"n": N, "accuracy": float(correct)}), "eval/merged/metrics.json")


@pytest.fixture(scope="module")
def prefect(tmp_path_factory):
    from tests.conftest import start_prefect_server

    with start_prefect_server(tmp_path_factory.mktemp("prefect") / "home") as server:
        with server.settings():
            yield server


def test_a_champion_that_moved_is_compared_only_where_the_candidate_was_scored(tmp_path, monkeypatch, prefect):
    import mlflow
    from mlflow import MlflowClient

    from qlora_ops.flows.retrain import register
    from qlora_ops.tasks.registry import tracking
    from qlora_ops.tasks.core.config import Params

    uri = f"sqlite:///{tmp_path}/m.db"
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", uri)  # restored after the test
    c = MlflowClient(uri)
    exp = c.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    params = Params(registry={"model_name": "moved", "experiment": "e"}, state_dir=str(tmp_path / "state"))

    def version(correct: bool, score_key: str) -> str:
        run = c.create_run(exp).info.run_id
        c.log_text(run, "x", "model/MLmodel")
        saved_eval(c, run, correct)
        return mlflow.register_model(f"runs:/{run}/model", "moved", tags={"status": "ready", "mlflow_run_id": run,
                                                                          "score_key": score_key}).version

    v1 = version(False, "K")
    c.set_registered_model_alias("moved", "champion", v1)

    def run_register(fp: str) -> tuple[str, dict]:
        run = c.create_run(exp, tags={"qlora_ops.fingerprint": fp}).info.run_id
        c.log_text(run, "x", "model/MLmodel")
        ms = {"models": {m: {"accuracy": 1.0} for m in ("base", "qlora", "merged")}, "rows": {"merged": rows(True)},
              "champion": {"version": int(v1), "how": "saved", **rows(False)},  # what the model stage saw
              "score_key": "K", "model_uri": f"runs:/{run}/model"}
        out = register(params, tmp_path, run, ms, {"data_version": "d", "prepared_dir": str(tmp_path)}, fp,
                       {"git_commit": "c", "source_sha": "s"})
        return run, out

    # v2 takes the champion while the model stage runs; it was scored elsewhere (another score key).
    v2 = version(False, "OTHER")
    c.set_registered_model_alias("moved", "champion", v2)
    run, out = run_register("fp-1")
    assert out["deferred"] and not out["promoted"] and out["champion_version"] == int(v2), out
    assert "moved from v1 to v2" in out["reason"] and "score key" in out["reason"], out["reason"]
    t = c.get_model_version("moved", str(out["version"])).tags
    assert t["status"] == "deferred" and t["promoted"] == "false" and t["promotion_reason"] == out["reason"]
    assert c.get_registered_model("moved").aliases["champion"] == v2
    # Not a decision: the next run on the same inputs is not skipped as "nothing new"; it decides.
    c.set_tag(run, "qlora_ops.outcome", "deferred")
    c.set_terminated(run, "FINISHED")
    assert tracking.find_fingerprint("moved", exp, "fp-1") is None

    # Scored where the candidate was (same score key): compared on its own saved predictions, decided.
    v3 = version(False, "K")
    c.set_registered_model_alias("moved", "champion", v3)
    _, out = run_register("fp-2")
    assert not out["deferred"] and out["promoted"] and out["champion_version"] == out["version"], out
    assert f"champion v{v3}: its own saved predictions" in out["reason"], out["reason"]
