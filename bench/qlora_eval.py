"""The QLoRA evaluation on the CPU, both ways in one run: bitsandbytes dequantizing every 4-bit weight at every
generated token (what evaluation did before), and the weights dequantized once (tasks.model.modeling.
dequantize_once, what it does now). Same base (the default loop's 4-bit SmolLM2 copy), same adapter (a LoRA
of the default params with random B, so it changes the answers), same rows (the default sample's test
split): seconds per 100 rows each, the ratio, and whether the answers are identical. The LoRA evaluation
(full-precision base + the same adapter) is timed beside them: the target is QLoRA as fast as LoRA.

    python bench/qlora_eval.py            # ~3 min on 2 idle cores
    python bench/qlora_eval.py --rows 40  # fewer rows

Both bitsandbytes kernels are timed: its default CPU kernel, and the AVX512-BF16 repacked one it picks on
CPUs that have it (this machine's answers used to depend on which).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from qlora_ops.tasks.core.config import Params
from qlora_ops.tasks.data.prepare import prepare
from qlora_ops.tasks.data.samples import build_sample
from qlora_ops.tasks.evaluate.predict import generate, test_rows
from qlora_ops.tasks.model.base import quantized_base, resolve_base_model
from qlora_ops.tasks.model.modeling import add_lora, dequantize_once, load_model

ROOT = Path(__file__).resolve().parent.parent


def with_adapter(base: Path, p: Params, quantized: bool):
    model, tok = load_model(base, p, quantized=quantized)
    model = add_lora(model, p, quantized=quantized)
    g = torch.Generator().manual_seed(0)
    for name, t in sorted(model.named_parameters()):
        if "lora_B" in name:
            t.data = torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.02
    model.eval()
    return model, tok


def timed(model, tok, rows, p: Params) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    with torch.no_grad():
        preds = generate(model, tok, rows, p.eval.batch_size, p.eval.max_new_tokens or 8, desc="bench")
    return time.perf_counter() - t0, [x["prediction"] for x in preds]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100)
    a = ap.parse_args()
    p = Params()
    torch.set_num_threads(p.training.threads or torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp)
        raw = ws / p.data.raw
        raw.parent.mkdir(parents=True)
        build_sample(raw)
        prepare(p, ws, out=ws / "prepared", lineage_aware=False)
        rows = test_rows(p, ws / "prepared" / "test.jsonl")[: a.rows]
        base = resolve_base_model(p, ROOT)
        qbase = quantized_base(p, ROOT, base)
        res = {}
        for kernel in ("default", "avx512bf16"):
            m, tok = with_adapter(qbase, p, quantized=True)
            import bitsandbytes as bnb
            layers = [x for x in m.modules() if isinstance(x, bnb.nn.Linear4bit)]
            if kernel == "default":
                for x in layers:
                    x.support_avx512bf16_for_cpu = False
            elif not layers[0].support_avx512bf16_for_cpu:
                continue  # this CPU has no AVX512-BF16: bitsandbytes never picks that kernel here
            res[f"qlora, bitsandbytes {kernel} kernel"] = timed(m, tok, rows, p)
            del m
        m, tok = with_adapter(qbase, p, quantized=True)
        dequantize_once(m)
        res["qlora, dequantized once"] = timed(m, tok, rows, p)
        del m
        m, tok = with_adapter(base, p, quantized=False)
        res["lora (full-precision base)"] = timed(m, tok, rows, p)
    ref_s, ref_answers = res["qlora, bitsandbytes default kernel"]
    print(f"{len(rows)} rows, eval.batch_size {p.eval.batch_size}, {torch.get_num_threads()} threads")
    print(f"{'model':<40}{'s/100 rows':>12}{'vs default kernel':>20}{'answers identical':>20}")
    for k, (s, ans) in res.items():
        print(f"{k:<40}{100 * s / len(rows):>12.1f}{s / ref_s:>20.2f}{str(ans == ref_answers):>20}")
    out = ROOT / "bench" / "out" / "qlora_eval.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({k: {"s_per_100": 100 * s / len(rows), "identical_to_default_kernel": ans == ref_answers}
                               for k, (s, ans) in res.items()}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
