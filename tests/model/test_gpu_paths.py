"""What only a GPU runs, checked on CPU: the compute dtype `auto` picks for a compute capability, fp16
training with a gradient scaler (torch.amp.GradScaler runs on CPU too), the CUDA cache handed back, and
the 4-bit base quantized in a child process on CUDA machines, so the parent holds no GPU memory while
the training processes run. bench/gpu_check.sh runs the real thing on a GPU."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_ops.tasks.core.config import QuantParams
from qlora_ops.tasks.model.modeling import compute_dtype
from tests.conftest import tiny_params


def test_auto_compute_dtype_is_bf16_only_where_the_gpu_has_it_natively():
    cuda, auto = torch.device("cuda"), QuantParams()
    assert compute_dtype(auto, cuda, capability=(7, 5)) == torch.float16   # T4: bf16 only emulated
    assert compute_dtype(auto, cuda, capability=(7, 0)) == torch.float16   # V100
    assert compute_dtype(auto, cuda, capability=(8, 0)) == torch.bfloat16  # A100
    assert compute_dtype(auto, cuda, capability=(9, 0)) == torch.bfloat16  # H100
    assert compute_dtype(auto, torch.device("cpu")) == torch.float32
    chosen = QuantParams(compute_dtype="bfloat16")
    assert compute_dtype(chosen, cuda, capability=(7, 5)) == torch.bfloat16  # an explicit choice stands


def test_fp16_trains_with_a_gradient_scaler_that_skips_overflowing_steps(tiny_model_dir, toy_data, tmp_path, monkeypatch):
    """fp16 compute (here on CPU): the loss is scaled, gradients are unscaled before clipping, and a step
    whose scaled gradients overflow is skipped (the scale halves, the schedule waits) instead of stopping
    the run as diverged. The scaler starts at 2^24 here so that the first steps really overflow."""
    from qlora_ops.tasks.train.distributed import Dist
    from qlora_ops.tasks.train.loop import train

    asked = []

    def high_start(self, dev, enabled):
        asked.append(enabled)
        return torch.amp.GradScaler(dev.type, init_scale=2.0**24, enabled=enabled)

    monkeypatch.setattr(Dist, "grad_scaler", high_start)
    p = tiny_params(tiny_model_dir, max_steps=10, eval_every=10, save_every=10, warmup_steps=0)
    p = p.model_copy(update={"quantization": p.quantization.model_copy(update={"compute_dtype": "float16"})})
    res = train(p, tiny_model_dir, toy_data, tmp_path / "run", "lora")
    assert asked == [True]
    h = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    skipped = [x["skipped"] for x in h]
    first = skipped.index(False)  # the first step taken
    assert 0 < first < len(h) - 2 and not any(skipped[first:]), skipped
    assert [x["grad_scale"] for x in h[:first + 1]] == [2.0**24 / 2**i for i in range(first + 1)]
    assert not any(math.isfinite(x["grad_norm"]) for x in h[:first]) and all(math.isfinite(x["grad_norm"]) for x in h[first:])
    assert len({x["lr"] for x in h[:first + 1]}) == 1  # the schedule starts with the first real step
    w = load_file(Path(res["adapter_dir"]) / "adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in w.values()) and any(float(v.abs().max()) > 0 for k, v in w.items() if "lora_B" in k)
    assert {v.dtype for v in w.values()} == {torch.float32}  # fp32 master weights under fp16 compute


def test_release_memory_hands_the_cuda_cache_back(monkeypatch):
    from qlora_ops.tasks.core.memory import release_memory

    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    release_memory()
    assert emptied == [1]


@pytest.mark.slow
def test_on_cuda_the_4bit_base_is_quantized_in_a_child_process(tiny_model_dir, tmp_path, monkeypatch):
    """The parent (which then starts the trainings) never loads a model; the copy is the one the
    in-process path makes and finds."""
    import qlora_ops.tasks.model.modeling as M
    from qlora_ops.tasks.model.base import quantized_base
    from qlora_ops.tasks.model.modeling import saved_4bit
    from qlora_ops.tasks.core.util import verify_manifest

    def no_load(*a, **k):
        raise AssertionError("the parent process loaded a model")

    p = tiny_params(tiny_model_dir)
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.setattr(M, "device", lambda: torch.device("cuda"))  # this process believes it has a GPU
    monkeypatch.setattr(M, "load_model", no_load)
    monkeypatch.setattr(M, "save_quantized", no_load)
    d = quantized_base(p, ws, tiny_model_dir)  # the child runs on what this machine really has (CPU)
    assert verify_manifest(d) is None and saved_4bit(d)["bnb_4bit_quant_type"] == "nf4"
    monkeypatch.undo()
    assert quantized_base(p, ws, tiny_model_dir) == d  # found in place by the in-process path
