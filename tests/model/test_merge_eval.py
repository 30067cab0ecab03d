"""Merge and evaluate on a tiny random Llama: merged == unmerged, metrics are computed, not assumed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_ops.tasks.evaluate.predict import evaluate_model, score
from qlora_ops.tasks.model.merge import logit_drift, merge
from qlora_ops.tasks.train.loop import train
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


def test_merged_model_is_what_people_deploy(tiny_model_dir, trained, tmp_path):
    """bf16 base -> bf16 merged model (not fp32 at twice the size), evaluated in bf16; a plain
    transformers load prompts with the training system prompt and stops on the template's turn end."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_ops.tasks.model.prompting import format_prompt, turn_end_id

    p, data, adapter, d = trained
    bf16_base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(bf16_base)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(bf16_base)
    info = merge(p, bf16_base, adapter, d / "merged-bf16")
    assert info["dtype"] == "bfloat16" and info["system_prompt_in_template"]
    with safe_open(str(d / "merged-bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    m = evaluate_model(p, "merged", d / "merged-bf16", data / "test.jsonl", d / "ev-bf16", as_saved=True)
    assert m["n"] == 16

    tok = AutoTokenizer.from_pretrained(d / "merged-bf16")
    plain = tok.apply_chat_template([{"role": "user", "content": "Item 1?"}], tokenize=False, add_generation_prompt=True)
    assert plain == format_prompt(tok, p.data.system_prompt, "Item 1?")
    gen = AutoModelForCausalLM.from_pretrained(d / "merged-bf16").generation_config
    assert turn_end_id(tok) in gen.eos_token_id
