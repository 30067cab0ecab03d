"""Model construction shared by train, evaluate and merge: base weights (4-bit NF4 or in compute
dtype), a new LoRA adapter to train, or a saved one to run.

One place decides the device, the compute dtype and the quantization config, so the model a QLoRA
adapter was trained on is the model it is evaluated and merged against. `check_finite` lives here
because both sides of that boundary need it: training refuses to checkpoint NaN weights, merging
refuses to write them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from qlora_ops.tasks.core.config import Params, QuantParams
from qlora_ops.tasks.core.hardware import compute_dtype, device  # noqa: F401  (the model code's names for them)
from qlora_ops.tasks.core.memory import release_memory
from qlora_ops.tasks.core.util import atomic_dir
from qlora_ops.tasks.core.util import check_manifest


class DivergenceError(RuntimeError):
    """Non-finite loss or gradient: training stopped, nothing downstream may run."""


def bnb_config(q: QuantParams, dev: torch.device):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(q, dev),
        bnb_4bit_quant_storage=getattr(torch, q.quant_storage),
    )


def saved_dtype(model_dir: Path) -> torch.dtype:
    """The dtype a model directory's weights were saved in (config.json), float32 if it does not say."""
    import json

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""))


def saved_4bit(model_dir: Path) -> dict | None:
    """The quantization_config of a directory saved already in 4 bits (save_quantized), else None."""
    import json

    q = json.loads((Path(model_dir) / "config.json").read_text()).get("quantization_config")
    return q if q and q.get("load_in_4bit") else None


def _check_4bit_matches(model_dir: Path, q: dict, params: Params, dev: torch.device) -> None:
    want = bnb_config(params.quantization, dev).to_dict()
    keys = ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype", "bnb_4bit_quant_storage")
    diff = [f"{k}: saved {q.get(k)!r}, params want {want[k]!r}" for k in keys if str(q.get(k)) != str(want[k])]
    if diff:
        raise ValueError(f"{model_dir}: 4-bit copy made with other quantization settings ({'; '.join(diff)}); "
                         "delete it or point at the full-precision base")


def load_model(base_dir: Path, params: Params, quantized: bool, dev: torch.device | None = None,
               dtype: torch.dtype | None = None):
    """Base model, 4-bit (QLoRA) or in compute dtype (LoRA baseline / evaluation), or in `dtype` when
    given (a merged model is evaluated in the dtype it is registered in). Safetensors only.
    A QLoRA base may be a full-precision dir (quantized while loading) or a 4-bit copy saved by
    save_quantized: the same tensors, without reading the full-precision file (the load's peak)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = dev or device()
    dtype = dtype or compute_dtype(params.quantization, dev)
    kw = dict(dtype=dtype, use_safetensors=True, trust_remote_code=params.model.trust_remote_code)
    prequantized = saved_4bit(base_dir)
    if prequantized and not quantized:
        raise ValueError(f"{base_dir} holds 4-bit weights; the LoRA baseline and evaluation need the full-precision base")
    if quantized:
        kw.update(device_map={"": dev.type if dev.type == "cpu" else dev.index or 0})
        if prequantized:  # its config.json carries the quantization config; it must be the one params ask for
            _check_4bit_matches(base_dir, prequantized, params, dev)
        else:
            kw.update(quantization_config=bnb_config(params.quantization, dev))
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kw)
    if not quantized:
        model.to(dev)
    elif dev.type == "cpu":
        _off_the_checkpoint(model)
    tok = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=params.model.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def save_quantized(base_dir: Path, params: Params, out_dir: Path, dev: torch.device | None = None) -> Path:
    """Quantize a full-precision base once and save the 4-bit model (safetensors: packed NF4 weights
    and their quant states; unquantized tensors in the compute dtype) with its tokenizer. Every QLoRA
    load after that reads ~4.1 bits per quantized weight instead of the whole fp32 file (SmolLM2:
    ~170 MB instead of 540 MB), which was the peak of a QLoRA training."""

    model, tok = load_model(base_dir, params, quantized=True, dev=dev)
    with atomic_dir(out_dir) as tmp:  # complete or absent, with a manifest
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    del model
    release_memory()
    return Path(out_dir)


def _off_the_checkpoint(model) -> None:
    """After a 4-bit load the tensors left unquantized (embeddings, norms) are still views of the mmapped
    checkpoint, which keeps every page of the full-precision file read for quantizing in the RSS
    (measured: 540 MB of file pages for a 160 MB model); loaded from a 4-bit copy, the packed weights
    and their quant states are views too (184 MB of file pages). Own copies let the mapping go; then
    the freed load buffers go back to the OS."""

    with torch.no_grad():
        for m in model.modules():
            for name, p in m.named_parameters(recurse=False):
                p.data = p.data.clone()  # packed 4-bit data too: loaded from a 4-bit copy they are file views
                if (qs := getattr(p, "quant_state", None)) is not None:
                    _own_quant_state(qs)
            for name, b in m.named_buffers(recurse=False):
                if b is not None:
                    m._buffers[name] = b.clone()
    release_memory()


def _own_quant_state(qs) -> None:
    for attr in ("absmax", "code", "offset"):
        if isinstance(t := getattr(qs, attr, None), torch.Tensor):
            setattr(qs, attr, t.clone())
    if getattr(qs, "state2", None) is not None:
        _own_quant_state(qs.state2)


def load_with_adapter(params: Params, model_dir: Path, adapter_dir: Path | None = None, quantized: bool = False,
                      as_saved: bool = False):
    """A model ready to run, in eval mode.
    base: (model_dir) ; LoRA: (model_dir, adapter) ; QLoRA: (model_dir, adapter, quantized=True) ;
    merged: (merged_dir, as_saved=True), in exactly the dtype it was saved (and is registered) in."""

    # A dir we wrote (merged model, adapter, converted base) is loaded only if it matches its manifest.
    model, tok = load_model(check_manifest(model_dir), params, quantized,
                            dtype=saved_dtype(model_dir) if as_saved else None)
    if adapter_dir is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(check_manifest(adapter_dir)))
    if quantized and model.device.type == "cpu":
        dequantize_once(model)
    model.eval()
    return model, tok


class DequantizedLinear(torch.nn.Module):
    """A 4-bit linear layer's weights dequantized once, computing as bitsandbytes' CPU path does: input in
    the layer's compute dtype, F.linear against the dequantized weight, output back in the input's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        self.compute_dtype = compute_dtype
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(self.compute_dtype), self.weight, self.bias).to(x.dtype)


@torch.no_grad()
def dequantize_once(model) -> int:
    """Evaluation on the CPU: every bitsandbytes 4-bit linear (LoRA's base layers included) becomes a
    DequantizedLinear holding the NF4 weights dequantized once (double-quantized absmax included), instead of
    dequantizing every weight at every generated token: the same numbers as bitsandbytes' default CPU kernel
    (dequantize to the compute dtype, then F.linear), for the memory of the full-precision layers (what the
    LoRA evaluation holds anyway). Why: it takes the CPU out of the result, since on a CPU with AVX512-BF16
    bitsandbytes switches to a repacked kernel of its own whose answers differ (QLoRA scored 0.5981 on such a
    CPU, 0.6075 on others, same lock); and it is as fast as the LoRA evaluation. bench/qlora_eval.py, 2 cores,
    s/100 rows: bitsandbytes default kernel 17.0, its AVX512-BF16 kernel 12.9 (other answers), dequantized
    once 16.3 (identical answers), LoRA 15.6. Returns the layers replaced."""
    import bitsandbytes as bnb

    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, bnb.nn.Linear4bit):
                continue
            qs = child.weight.quant_state
            cd = child.compute_dtype or torch.float32
            absmax = qs.absmax
            if qs.nested:  # what bitsandbytes' gemm does: the 8-bit absmax to float32, plus its offset
                absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
                    qs.absmax, qs.state2.absmax, qs.state2.code, qs.state2.blocksize, torch.float32) + qs.offset
            w = torch.ops.bitsandbytes.dequantize_4bit.default(child.weight.data.reshape(-1, 1), absmax, qs.blocksize,
                                                              qs.quant_type, qs.shape, cd)
            setattr(parent, name, DequantizedLinear(w, child.bias, cd))
            n += 1
    return n


def add_lora(model, params: Params, quantized: bool):
    """A fresh trainable adapter on a loaded base. The seed is set right here so the LoRA init is a
    function of params alone, whoever builds the model (the loop, a test, a multi-process rank)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:  # fp32 norms/embeddings, input grads for checkpointing: the QLoRA recipe
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=params.training.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif params.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lp = params.lora
    torch.manual_seed(params.seed)  # seed right before adapter creation: LoRA init is reproducible
    cfg = LoraConfig(r=lp.r, lora_alpha=lp.alpha, lora_dropout=lp.dropout, target_modules=lp.target_modules,
                     modules_to_save=lp.modules_to_save, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def check_finite(sd: dict[str, torch.Tensor], what: str) -> None:
    """safetensors happily stores NaN: callers check before writing or after reading weights."""
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise DivergenceError(f"{what}: non-finite values in {bad[:3]} (lower training.lr or raise max_grad_norm clipping)")
