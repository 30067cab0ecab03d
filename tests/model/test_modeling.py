"""The 4-bit copy of the base (tasks.model.modeling.save_quantized, tasks.model.base.quantized_base): the same
tensors and outputs as quantizing while loading, made once, rebuilt when damaged, refused when it
was made with other quantization settings."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from qlora_ops.tasks.model.base import quantized_base
from qlora_ops.tasks.model.modeling import load_model, save_quantized
from tests.conftest import tiny_params


def _4bit_tensors(model) -> dict[str, torch.Tensor]:
    import bitsandbytes as bnb

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            out[name] = m.weight.data
            out[name + ".absmax"] = m.weight.quant_state.absmax
    return out


@pytest.fixture(scope="module")
def nf4_dir(tiny_model_dir, tmp_path_factory):
    p = tiny_params(tiny_model_dir)
    return p, save_quantized(tiny_model_dir, p, tmp_path_factory.mktemp("nf4") / "base")


def test_4bit_copy_holds_exactly_what_quantizing_on_load_gives(tiny_model_dir, nf4_dir):
    p, d = nf4_dir
    fresh, tok = load_model(tiny_model_dir, p, quantized=True)
    saved, _ = load_model(d, p, quantized=True)
    a, b = _4bit_tensors(fresh), _4bit_tensors(saved)
    assert a and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = tok("Item 3: this one is about re. Label?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, saved(input_ids=ids).logits)
    # the linear layers' weights are stored packed, 4 bits each (embeddings stay in the compute dtype)
    assert _linear_bytes(d) < 0.2 * _linear_bytes(tiny_model_dir)


def _linear_bytes(model_dir: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            n += sum(_nbytes(st, k) for k in st.keys() if k.endswith("proj.weight"))
    return n


def _nbytes(st, k: str) -> int:
    t = st.get_tensor(k)
    return t.numel() * t.element_size()


def test_4bit_copy_is_refused_where_full_precision_or_other_settings_are_needed(nf4_dir):
    p, d = nf4_dir
    with pytest.raises(ValueError, match="full-precision base"):
        load_model(d, p, quantized=False)
    other = p.model_copy(update={"quantization": p.quantization.model_copy(update={"double_quant": False})})
    with pytest.raises(ValueError, match="bnb_4bit_use_double_quant"):
        load_model(d, other, quantized=True)


def test_quantized_base_is_made_once_and_rebuilt_when_damaged(tiny_model_dir, tmp_path):
    p = tiny_params(tiny_model_dir)
    ws = tmp_path / "ws"
    ws.mkdir()
    d = quantized_base(p, ws, tiny_model_dir)
    weights = d / "model.safetensors"
    made = weights.stat().st_mtime_ns
    assert quantized_base(p, ws, tiny_model_dir) == d and weights.stat().st_mtime_ns == made  # reused
    other = p.model_copy(update={"quantization": p.quantization.model_copy(update={"quant_type": "fp4"})})
    assert quantized_base(other, ws, tiny_model_dir) != d  # other settings, other copy
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    assert quantized_base(p, ws, tiny_model_dir) == d
    assert weights.stat().st_size > 1000
    assert json.loads((d / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"


def test_a_replaced_base_gets_a_new_4bit_copy(tiny_model_dir, tmp_path):
    """Same file names and sizes (a retrained checkpoint of the same architecture), new weights."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    p = tiny_params(base)
    ws = tmp_path / "ws"
    ws.mkdir()
    first = quantized_base(p, ws, base)
    w = base / "model.safetensors"
    st = w.stat()
    data = bytearray(w.read_bytes())
    data[-3] ^= 0x40  # one weight changed (the last tensor's bytes), same names, same size
    w.write_bytes(bytes(data))
    assert w.stat().st_size == st.st_size
    assert quantized_base(p, ws, base) != first
    # only touched (a copy, a restore from backup): the same content is the same base
    data[-3] ^= 0x40
    w.write_bytes(bytes(data))
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert quantized_base(p, ws, base) == first


def test_training_and_merging_on_the_4bit_copy_match_the_full_precision_base(tiny_model_dir, nf4_dir, tmp_path):
    """What the flow does (train, merge against the copy) gives the adapter and merged weights that
    quantizing while loading gives."""
    from safetensors.torch import load_file

    from qlora_ops.tasks.model.merge import merge
    from qlora_ops.tasks.train.loop import train
    from tests.conftest import write_toy_splits

    p, d = nf4_dir
    p = tiny_params(tiny_model_dir, max_steps=3)
    data = write_toy_splits(tmp_path / "data")
    a = train(p, tiny_model_dir, data, tmp_path / "fp", "qlora")
    b = train(p, d, data, tmp_path / "nf4", "qlora")
    wa = load_file(Path(a["adapter_dir"]) / "adapter_model.safetensors")
    wb = load_file(Path(b["adapter_dir"]) / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    merge(p, tiny_model_dir, Path(a["adapter_dir"]), tmp_path / "m-fp")
    merge(p, tiny_model_dir, Path(b["adapter_dir"]), tmp_path / "m-nf4", qbase_dir=d)
    ma, mb = load_file(tmp_path / "m-fp" / "model.safetensors"), load_file(tmp_path / "m-nf4" / "model.safetensors")
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def test_qlora_evaluated_on_weights_dequantized_once_gives_bitsandbytes_own_numbers(nf4_dir):
    """Evaluation on the CPU dequantizes each 4-bit layer once (tasks.model.modeling.dequantize_once), under
    the LoRA layers too: the logits and greedy answers are bitsandbytes' default CPU kernel's, bit for bit
    (its AVX512-BF16 repacked kernel turned off in the reference: that one depends on the CPU)."""
    import bitsandbytes as bnb

    from qlora_ops.tasks.model.modeling import DequantizedLinear, add_lora, dequantize_once

    p, d = nf4_dir
    models = []
    for _ in range(2):
        m, tok = load_model(d, p, quantized=True)
        m = add_lora(m, p, quantized=True)
        g = torch.Generator().manual_seed(0)
        for name, t in sorted(m.named_parameters()):
            if "lora_B" in name:
                t.data = torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.05  # an adapter that matters
        m.eval()
        models.append(m)
    ref, fast = models
    layers = [x for x in ref.modules() if isinstance(x, bnb.nn.Linear4bit)]
    for x in layers:
        x.support_avx512bf16_for_cpu = False
    assert dequantize_once(fast) == len(layers) > 0
    assert not any(isinstance(x, bnb.nn.Linear4bit) for x in fast.modules())
    assert sum(isinstance(x, DequantizedLinear) for x in fast.modules()) == len(layers)
    ids = tok(["Item 3: this one is about re. Label?", "Which module is this from? os"], return_tensors="pt",
              padding=True)
    with torch.no_grad():
        a, b = ref(**ids).logits, fast(**ids).logits
        assert torch.equal(a, b), (a - b).abs().max()
        ga = ref.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        gb = fast.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(ga, gb)
