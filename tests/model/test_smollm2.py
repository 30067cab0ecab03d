"""The real path on the real embedded weights: GGUF -> safetensors, 4-bit NF4 load, a few QLoRA
steps, generation that stops with EOS. Slow-ish (~2 min on 2 cores), kept so the real path stays proven."""
from __future__ import annotations

from pathlib import Path

import pytest

from tasks.base_model import resolve_base_model
from tasks.config import Params
from tasks.evaluate import evaluate_model, generate
from tasks.modeling import load_with_adapter
from tasks.train import train
from tests.conftest import write_toy_splits

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> tuple[Params, Path]:
    state = tmp_path_factory.mktemp("state")
    p = Params(state_dir=str(state), model={"max_seq_len": 96},
               training={"max_steps": 12, "batch_size": 8, "lr": 2e-3, "eval_every": 12, "save_every": 100,
                         "warmup_steps": 2, "threads": 2},
               eval={"batch_size": 16, "max_new_tokens": 8})
    base = resolve_base_model(p, state)
    return p, base


def test_conversion_is_safetensors_and_cached(smollm2):
    p, base = smollm2
    assert (base / "model.safetensors").is_file() and (base / "config.json").is_file()
    assert "quantization_config" not in (base / "config.json").read_text()
    assert resolve_base_model(p, Path(p.state_dir)) == base  # second call: cache hit (marker matches)


def test_4bit_base_answers_a_prompt(smollm2):
    import bitsandbytes as bnb

    p, base = smollm2
    model, tok = load_with_adapter(p, base, quantized=True)
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert n4 == 30 * 7  # every linear layer of every block is NF4
    w = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)).weight
    assert w.quant_state.quant_type == "nf4" and w.quant_state.nested  # double quantization
    out = generate(model, tok, [{"id": "q", "system": "You are a helpful assistant.", "prompt": "What is the capital of France?",
                                 "completion": "Paris"}], batch_size=1, max_new_tokens=12)
    assert "paris" in out[0]["prediction"].lower(), out


def test_qlora_steps_teach_the_format_and_it_stops(smollm2, tmp_path):
    p, base = smollm2
    data = write_toy_splits(tmp_path / "data", n_train=96, n_val=16, n_test=16)
    res = train(p, base, data, tmp_path / "run", "qlora")
    hist = [l for l in Path(res["history"]).read_text().splitlines()]
    assert len(hist) == 12 and res["final_val_loss"] < 1.0, res
    m = evaluate_model(p, "qlora", base, data / "test.jsonl", tmp_path / "ev", Path(res["adapter_dir"]), quantized=True)
    assert m["eos_rate"] == 1.0, m          # every generation ended with <|im_end|>, none ran to max_new_tokens
    assert m["accuracy"] >= 0.9, m
