"""Merge stage: fold the QLoRA adapter into a full-precision copy of the base and save safetensors.

The adapter was trained against the NF4-quantized weights, so by default we merge it into the
*dequantized* NF4 weights (held in float32): the merged model then computes what the QLoRA model
computed. Merging into a 4-bit model would re-quantize W + BA and change outputs; merging into the
original weights ("original") is available but drifts by the quantization error.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import torch

from qlora_ops.tasks.core.config import Params
from qlora_ops.tasks.model.modeling import check_finite, load_model, load_with_adapter, saved_dtype
from qlora_ops.tasks.model.prompting import bake_system_prompt, stop_ids
from qlora_ops.tasks.core.util import atomic_dir


def dequantized_base(params: Params, base_dir: Path, qbase_dir: Path | None = None):
    """Full-precision model whose linear weights are exactly the dequantized NF4 weights QLoRA saw
    (those of `qbase_dir`, the 4-bit copy QLoRA trained on, when given; else quantized from base_dir)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    fp, tok = load_model(base_dir, params, quantized=False, dev=torch.device("cpu"))
    fp = fp.float()
    q, _ = load_model(qbase_dir or base_dir, params, quantized=True)
    fp_mods = dict(fp.named_modules())
    n = 0
    for name, mod in q.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            w = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float().cpu()
            fp_mods[name].weight.data.copy_(w.reshape(fp_mods[name].weight.shape))
            n += 1
    if n == 0:
        raise RuntimeError("no 4-bit linear layers found while dequantizing; is bitsandbytes working?")
    del q
    return fp, tok


def merge(params: Params, base_dir: Path, adapter_dir: Path, out_dir: Path,
          into: Literal["dequantized", "original"] = "dequantized", qbase_dir: Path | None = None) -> dict:
    from peft import PeftModel

    t0 = time.time()
    if into == "dequantized":
        model, tok = dequantized_base(params, base_dir, qbase_dir)
    else:
        model, tok = load_model(base_dir, params, quantized=False, dev=torch.device("cpu"))
        model = model.float()
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    check_finite(dict(merged.state_dict()), "merged model")
    # Merged in fp32 (exact), saved in the base model's own dtype: bf16 bases are registered, served
    # and evaluated (as_saved) in bf16, not at twice the size.
    dtype = saved_dtype(base_dir)
    merged = merged.to(dtype)
    # What a plain transformers / vLLM load needs to prompt and stop as training did: the system prompt
    # inside the chat template, and generation stopping on the template's turn end.
    baked = bake_system_prompt(tok, params.data.system_prompt)
    merged.generation_config.eos_token_id = stop_ids(tok)
    merged.generation_config.pad_token_id = tok.pad_token_id
    merged.generation_config.do_sample = False
    with atomic_dir(out_dir) as tmp:  # a merged dir exists only when complete
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return {"merged_dir": str(out_dir), "into": into, "dtype": str(dtype).replace("torch.", ""),
            "system_prompt_in_template": baked, "merge_seconds": time.time() - t0}


@torch.no_grad()
def logit_drift(params: Params, base_dir: Path, adapter_dir: Path, merged_dir: Path, texts: list[str]) -> float:
    """Max |logit difference| between the unmerged QLoRA model and the merged one on `texts`
    (`base_dir`: the base QLoRA trained on, full precision or its 4-bit copy)."""
    q, tok = load_with_adapter(params, base_dir, adapter_dir, quantized=True)
    m, _ = load_with_adapter(params, merged_dir)
    worst = 0.0
    for t in texts:
        ids = tok(t, return_tensors="pt").input_ids
        a = q(input_ids=ids.to(q.device)).logits.float().cpu()
        b = m(input_ids=ids.to(m.device)).logits.float().cpu()
        worst = max(worst, float((a - b).abs().max()))
    return worst
