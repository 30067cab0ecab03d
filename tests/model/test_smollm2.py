"""The real path on the real embedded weights: GGUF -> safetensors, 4-bit NF4 load, a few QLoRA
steps, generation that stops with EOS. Slow-ish (~2 min on 2 cores), kept so the real path stays proven."""
from __future__ import annotations

from pathlib import Path

import pytest

from qlora_ops.tasks.model.base import resolve_base_model
from qlora_ops.tasks.core.config import Params
from qlora_ops.tasks.evaluate.predict import evaluate_model, generate
from qlora_ops.tasks.model.modeling import load_with_adapter
from qlora_ops.tasks.train.loop import train
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
    """The 4-bit load is NF4 with double quantization everywhere, and both ways of running it answer: the
    bitsandbytes kernel (what training uses) and the evaluation's weights dequantized once."""
    import bitsandbytes as bnb

    from qlora_ops.tasks.model.modeling import DequantizedLinear, load_model

    p, base = smollm2
    model, tok = load_model(base, p, quantized=True)
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert n4 == 30 * 7  # every linear layer of every block is NF4
    w = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)).weight
    assert w.quant_state.quant_type == "nf4" and w.quant_state.nested  # double quantization
    row = [{"id": "q", "system": "You are a helpful assistant.", "prompt": "What is the capital of France?",
            "completion": "Paris"}]
    out = generate(model.eval(), tok, row, batch_size=1, max_new_tokens=12)
    assert "paris" in out[0]["prediction"].lower(), out
    ev, tok = load_with_adapter(p, base, quantized=True)  # evaluation on the CPU: dequantized once
    assert sum(isinstance(m, DequantizedLinear) for m in ev.modules()) == 30 * 7
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in ev.modules())
    out = generate(ev, tok, row, batch_size=1, max_new_tokens=12)
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


def test_llama3_style_template_trains_and_stops_on_its_turn_end(smollm2, tmp_path):
    """A Llama-3-style chat template, where eos_token (<|end_of_text|>) is NOT the turn end (<|eot_id|>):
    training targets end with <|eot_id|>, and evaluation stops there. Built locally on SmolLM2's weights:
    the new header/turn tokens start from the embeddings of SmolLM2's own <|im_start|>/<|im_end|> (plus
    a little noise, so the new turn end is its own token), as one would adapt a base to a new template."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_ops.tasks.model.prompting import turn_end_id
    from tests.code.test_prompting import LLAMA3

    p, base = smollm2
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_special_tokens({"eos_token": "<|end_of_text|>",
                            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = LLAMA3
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.resize_token_embeddings(len(tok))
    emb = model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for new, old in (("<|start_header_id|>", "<|im_start|>"), ("<|end_header_id|>", "<|im_start|>"),
                         ("<|eot_id|>", "<|im_end|>"), ("<|end_of_text|>", "<|endoftext|>")):
            src = emb[tok.convert_tokens_to_ids(old)]
            emb[tok.convert_tokens_to_ids(new)] = src + 0.05 * src.std() * torch.randn(src.shape, generator=g)
    model.config.eos_token_id = tok.eos_token_id
    l3 = tmp_path / "llama3-style"
    model.save_pretrained(l3)
    tok.save_pretrained(l3)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert turn_end_id(AutoTokenizer.from_pretrained(l3)) == eot != tok.eos_token_id

    data = write_toy_splits(tmp_path / "data", n_train=96, n_val=16, n_test=16)
    q = p.model_copy(update={"training": p.training.model_copy(update={"max_steps": 16})})
    res = train(q, l3, data, tmp_path / "run", "qlora")
    m = evaluate_model(q, "qlora", l3, data / "test.jsonl", tmp_path / "ev", Path(res["adapter_dir"]), quantized=True)
    assert m["eos_rate"] == 1.0, m  # every answer ended on a stop token, none ran to max_new_tokens ...

    # ... and that token is the template's turn end: regenerate raw ids and look at what ended each answer.
    from qlora_ops.tasks.model.modeling import load_with_adapter
    from qlora_ops.tasks.model.prompting import format_prompt
    mdl, t2 = load_with_adapter(q, l3, Path(res["adapter_dir"]), quantized=True)
    rows = [json.loads(x) for x in (data / "test.jsonl").read_text().splitlines()]
    t2.padding_side = "left"
    enc = t2([format_prompt(t2, r["system"], r["prompt"]) for r in rows], return_tensors="pt", padding=True,
             add_special_tokens=False)
    with torch.no_grad():
        out = mdl.generate(**enc, max_new_tokens=8, do_sample=False, eos_token_id=[eot, t2.eos_token_id],
                           pad_token_id=t2.pad_token_id)
    ends = [next((t for t in g[enc["input_ids"].shape[1]:].tolist() if t in (eot, t2.eos_token_id)), None) for g in out]
    assert ends.count(eot) == len(rows), ends
