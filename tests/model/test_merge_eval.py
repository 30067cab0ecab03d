"""Merge and evaluate on a tiny random Llama: merged == unmerged, metrics are computed, not assumed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.evaluate import evaluate_model, score
from tasks.merge import logit_drift, merge
from tasks.train import train
from tests.conftest import tiny_params


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    from tests.conftest import write_toy_splits
    d = tmp_path_factory.mktemp("mt")
    data = write_toy_splits(d / "data")
    p = tiny_params(tiny_model_dir, max_steps=6, lr=2e-2)
    res = train(p, tiny_model_dir, data, d / "run", "qlora")
    return p, data, Path(res["adapter_dir"]), d


def test_merge_into_dequantized_base_matches_qlora(tiny_model_dir, trained):
    p, data, adapter, d = trained
    info = merge(p, tiny_model_dir, adapter, d / "merged")
    assert (d / "merged" / "model.safetensors").is_file() and not (d / ".tmp-merged").exists()
    texts = ["Item 3: this one is about re. Label?", "hello"]
    drift = logit_drift(p, tiny_model_dir, adapter, d / "merged", texts)
    merge(p, tiny_model_dir, adapter, d / "merged-orig", into="original")
    drift_orig = logit_drift(p, tiny_model_dir, adapter, d / "merged-orig", texts)
    assert info["into"] == "dequantized"
    assert drift < 1e-2, drift
    assert drift < drift_orig / 5, (drift, drift_orig)  # merging into the original weights drifts by the NF4 error


def test_merged_model_evaluates_like_qlora(tiny_model_dir, trained):
    p, data, adapter, d = trained
    merge(p, tiny_model_dir, adapter, d / "merged2")
    q = evaluate_model(p, "qlora", tiny_model_dir, data / "test.jsonl", d / "ev-q", adapter, quantized=True)
    m = evaluate_model(p, "merged", d / "merged2", data / "test.jsonl", d / "ev-m")
    pq = [json.loads(l)["prediction"] for l in (d / "ev-q" / "predictions.jsonl").read_text().splitlines()]
    pm = [json.loads(l)["prediction"] for l in (d / "ev-m" / "predictions.jsonl").read_text().splitlines()]
    assert q["n"] == m["n"] == 16
    assert sum(a == b for a, b in zip(pq, pm)) >= 14  # greedy decoding agrees almost everywhere


def test_score_uses_local_metric_and_counts_eos():
    preds = [{"prediction": "JSON.", "reference": "json", "stopped": True},
             {"prediction": "The module is os", "reference": "os", "stopped": False},
             {"prediction": "`re`", "reference": "re", "stopped": True}]
    r = score(preds)
    assert r["accuracy"] == pytest.approx(2 / 3) and r["n"] == 3 and r["eos_rate"] == pytest.approx(2 / 3)
