"""`qlora-ops promote` decides on the gate metric the versions were judged on (their `gate_metric` tag),
not on exact match: two free-text versions that never match a reference exactly, one clearly better by
ROUGE-L, are told apart; versions judged on different metrics are refused, naming both. A local MLflow
store; the versions' saved predictions are written as the model stage logs them (eval/merged)."""
from __future__ import annotations

import json

import pytest

N = 60  # rows: enough for the paired policy to promote a clearly better candidate


def saved_eval(c, run_id: str, rouge: float) -> None:
    preds = "".join(json.dumps({"id": f"t{i}", "reference": "a b c", "prediction": "x", "correct": False,
                                "scores": {"exact_match": 0.0, "rouge_l": rouge + 0.01 * (i % 3)}}) + "\n"
                    for i in range(N))
    c.log_text(run_id, preds, "eval/merged/predictions.jsonl")
    c.log_text(run_id, json.dumps({"n": N, "accuracy": 0.0}), "eval/merged/metrics.json")


def test_promote_decides_on_the_versions_gate_metric(tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from qlora_ops.tasks.registry.register import PromotionError
    from qlora_ops.tasks.registry.manual import Actor, format_status, promote, status
    from qlora_ops.tasks.gates.policy import PromotionPolicy

    uri = f"sqlite:///{tmp_path}/m.db"
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", uri)  # restored after the test
    c = MlflowClient(uri)
    exp = c.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())

    def version(rouge: float, **tags) -> str:
        run = c.create_run(exp).info.run_id
        c.log_text(run, "x", "model/MLmodel")
        saved_eval(c, run, rouge)
        return mlflow.register_model(f"runs:/{run}/model", "ft", tags={"status": "ready", "mlflow_run_id": run,
                                                                       "score_key": "K", **tags}).version

    by = Actor("tester", False, "test")
    v1 = version(0.30, gate_metric="rouge_l", gate_score="0.31")
    c.set_registered_model_alias("ft", "champion", v1)
    v2 = version(0.50, gate_metric="rouge_l", gate_score="0.51")
    out = promote("ft", int(v2), "champion", PromotionPolicy(), tmp_path / "w", by=by)
    # Exact match is 0 for both on every row: decided on it, nothing could ever be promoted.
    assert out["promoted"], out
    assert c.get_registered_model("ft").aliases["champion"] == v2
    text = format_status(status("ft", ("champion", "challenger", "serving"), None))
    assert "champion    -> v2" in text and "serving     -> (none)" in text and "rouge_l=0.5100" in text, text

    v3 = version(0.90)  # no gate_metric tag: judged on exact match (a version from before free-text metrics)
    with pytest.raises(PromotionError, match="different gate metrics .*exact_match vs rouge_l"):
        promote("ft", int(v3), "champion", PromotionPolicy(), tmp_path / "w", by=by)
    assert c.get_registered_model("ft").aliases["champion"] == v2
