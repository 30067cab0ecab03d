"""tasks.evaluate.predict with several metrics on the tiny random Llama: the files of contract A, nll equal to the
training loss of each row, per_row of old evaluations."""
from __future__ import annotations

import json
import math

import pytest

from qlora_ops.tasks.evaluate.predict import evaluate_model, per_row
from qlora_ops.tasks.core.util import read_jsonl
from tests.conftest import tiny_params, write_toy_splits


@pytest.fixture(scope="module")
def evaluated(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("evm")
    data = write_toy_splits(d / "data", n_train=8, n_val=2, n_test=10)
    # Prompts and answers of different lengths: a batch is left-padded, which the nll must not feel.
    (data / "test.jsonl").write_text("".join(json.dumps(
        {"id": f"t{i}", "system": "Answer briefly.", "prompt": "Item " + "very " * (3 * i) + f"long {i}?",
         "completion": " ".join(["word"] * (1 + i % 4)) + f" {i}"}) + "\n" for i in range(10)))
    p = tiny_params(tiny_model_dir).model_copy(update={"eval": tiny_params(tiny_model_dir).eval.model_copy(
        update={"metric": "rouge_l", "report_metrics": ["token_f1", "nll"], "batch_size": 4})})
    res = evaluate_model(p, "base", tiny_model_dir, data / "test.jsonl", d / "ev")
    return p, data, d / "ev", res


def test_files_follow_the_contract(evaluated):
    p, data, ev, res = evaluated
    m = json.loads((ev / "metrics.json").read_text())
    assert m == res and m["metric"] == "rouge_l" and m["n"] == 10
    assert set(m["metrics"]) == {"rouge_l", "token_f1", "nll", "exact_match"} and m["accuracy"] == m["metrics"]["exact_match"]
    rows = read_jsonl(ev / "predictions.jsonl")
    assert [r["id"] for r in rows] == [r["id"] for r in read_jsonl(data / "test.jsonl")]
    for r in rows:
        assert set(r) == {"id", "reference", "prediction", "stopped", "new_tokens", "correct", "scores"}
        assert r["correct"] == (r["scores"]["exact_match"] == 1.0) and 0 <= r["scores"]["rouge_l"] <= 1
    for k, v in m["metrics"].items():
        if k != "nll":
            assert v == pytest.approx(sum(r["scores"][k] for r in rows) / len(rows))
    # nll: total nats over total tokens (not a mean of per-row means), and bits per byte of the references
    t = m["nll_totals"]
    assert m["metrics"]["nll"] == pytest.approx(t["nats"] / t["tokens"]) and t["tokenizer"]
    assert t["bytes"] == sum(len(r["reference"].encode()) for r in rows)
    assert t["bits_per_byte"] == pytest.approx(t["nats"] / math.log(2) / t["bytes"])
    assert m["metrics"]["nll"] != pytest.approx(sum(r["scores"]["nll"] for r in rows) / len(rows), rel=1e-6)
    pr = per_row(ev)
    assert pr["ids"] == [r["id"] for r in rows] and pr["answers"] == [r["prediction"] for r in rows]
    assert pr["scores"]["nll"] == [r["scores"]["nll"] for r in rows] and set(pr["scores"]) == set(m["metrics"])


def test_nll_is_the_training_loss_of_each_row(evaluated, tiny_model_dir):
    """Batched with left padding (evaluate) == one row at a time through the training loss (tasks.train.batches)."""
    import torch

    from qlora_ops.tasks.model.modeling import load_with_adapter
    from qlora_ops.tasks.model.prompting import encode
    from qlora_ops.tasks.train.batches import batch_loss, collate

    p, data, ev, _ = evaluated
    model, tok = load_with_adapter(p, tiny_model_dir)
    want = []
    with torch.no_grad():
        for r in read_jsonl(data / "test.jsonl"):
            loss, n = batch_loss(model, collate([encode(tok, r, p.model.max_seq_len)], tok.pad_token_id), torch.device("cpu"))
            want.append(float(loss))
    got = per_row(ev)["scores"]["nll"]
    assert got == pytest.approx(want, rel=1e-5)  # unpadded vs left-padded batches: equal up to float noise
    assert len(set(round(x, 4) for x in got)) > 1  # rows differ: not one batch mean copied to every row


def test_per_row_reads_evaluations_saved_before_scores(tmp_path):
    rows = [{"id": "a", "reference": "x", "prediction": "x", "stopped": True, "new_tokens": 1, "correct": True},
            {"id": "b", "reference": "y", "prediction": "z", "stopped": True, "new_tokens": 1, "correct": False}]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert per_row(tmp_path) == {"ids": ["a", "b"], "correct": [True, False], "answers": ["x", "z"],
                                 "scores": {"exact_match": [1.0, 0.0]}}
