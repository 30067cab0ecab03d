"""The multi-process path, on CPU: real torchrun with 2 processes (gloo), and the FSDP-ready build."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import yaml

from tasks.distributed import prepare_for_fsdp
from tasks.modeling import add_lora, load_model
from tasks.train import checkpoints, train
from tests.conftest import ROOT, tiny_params


def test_fsdp_ready_model_has_one_storage_dtype(tiny_model_dir):
    """FSDP flattens parameters per unit, so QLoRA for FSDP stores 4-bit weights as bf16 and casts the rest."""
    import bitsandbytes as bnb

    p = tiny_params(tiny_model_dir)
    p = p.model_copy(update={"quantization": p.quantization.model_copy(update={"quant_storage": "bfloat16"})})
    model, _ = load_model(tiny_model_dir, p, quantized=True)
    w = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)).weight
    assert w.dtype == torch.bfloat16 and w.quant_state.quant_type == "nf4"  # packed nibbles stored as bf16
    model = add_lora(model, p, quantized=True)
    assert len({q.dtype for q in model.parameters()}) > 1  # fp32 norms/LoRA before the FSDP cast
    assert prepare_for_fsdp(model, torch.bfloat16) == {torch.bfloat16}
    # still a working model after the cast: a forward pass gives finite logits
    out = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(out).all()


def test_two_process_ddp_matches_single_process(tiny_model_dir, toy_data, tmp_path):
    p = tiny_params(tiny_model_dir, max_steps=6, save_every=3, eval_every=3)
    pf = tmp_path / "p.yaml"
    pf.write_text(yaml.safe_dump(p.model_dump(mode="json")))
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "tasks.train", "--params", str(pf),
           "--kind", "qlora", "--base-dir", str(tiny_model_dir), "--data-dir", str(toy_data), "--out", str(run)]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((run / "result.json").read_text())
    assert res["processes"] == 2 and res["steps"] == 6
    assert r.stdout.count('"kind": "qlora"') == 1  # only rank 0 reports
    ck = run / "checkpoints" / f"step-{checkpoints(run / 'checkpoints')[-1]:06d}"
    assert (ck / "trainer_state.pt").is_file() and (ck / "trainer_state.rank1.pt").is_file()
    single = train(p, tiny_model_dir, toy_data, tmp_path / "single", "qlora")
    # same global batch and data order; DDP averages per-rank means, so close, not bit-equal
    assert abs(res["final_val_loss"] - single["final_val_loss"]) < 0.01, (res["final_val_loss"], single["final_val_loss"])
