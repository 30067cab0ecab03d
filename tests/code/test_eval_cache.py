"""A damaged eval cache (metrics.json or predictions.jsonl cut short by the disk) is evaluated again,
never trusted: tasks.evaluate.predict.cached_metrics, which the model stage reads its cache through."""
from __future__ import annotations

import json

from qlora_ops.tasks.evaluate.predict import cached_metrics


def write_eval(d, n=4):
    d.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"t{i}", "correct": i % 2 == 0, "prediction": "x"} for i in range(n)]
    (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "metrics.json").write_text(json.dumps({"model": "qlora", "accuracy": 0.5, "n": n}))


def test_a_complete_cache_is_used(tmp_path):
    write_eval(tmp_path / "e")
    assert cached_metrics(tmp_path / "e") == {"model": "qlora", "accuracy": 0.5, "n": 4}
    assert cached_metrics(tmp_path / "missing") is None


def test_truncated_metrics_or_predictions_are_not_trusted(tmp_path, caplog):
    write_eval(tmp_path / "m")
    text = (tmp_path / "m" / "metrics.json").read_text()
    (tmp_path / "m" / "metrics.json").write_text(text[: len(text) // 2])
    assert cached_metrics(tmp_path / "m") is None

    write_eval(tmp_path / "p")
    lines = (tmp_path / "p" / "predictions.jsonl").read_text().splitlines(True)
    (tmp_path / "p" / "predictions.jsonl").write_text("".join(lines[:2]))  # whole lines lost: counts differ
    assert cached_metrics(tmp_path / "p") is None

    write_eval(tmp_path / "q")
    body = (tmp_path / "q" / "predictions.jsonl").read_text()
    (tmp_path / "q" / "predictions.jsonl").write_text(body[:-15])  # cut inside the last row
    assert cached_metrics(tmp_path / "q") is None
    assert "damaged eval cache" in caplog.text
