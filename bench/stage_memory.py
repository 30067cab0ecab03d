"""Peak RSS of each model stage of the default loop, each run as the flow runs it (tasks.core.child: a fresh
process that returns), on the embedded SmolLM2-135M: one row per stage, with the child's peak, its
after-import baseline, and what is above that (the model copies and transients).

    python bench/stage_memory.py                     # glibc
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python bench/stage_memory.py
    python bench/stage_memory.py --state /tmp/sm     # its own state dir: converts and quantizes there too

Adapters are fresh (untrained) LoRA adapters of the default shape: a trained one has the same tensors, so
the same memory. Rows: 107 synthetic test rows (the default test split's count), eval.batch_size 32,
max_new_tokens 8. The parent row is this process after importing the flow (Prefect, MLflow, torch, ...):
what the flow's own process holds while the children run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def make_adapter(params, base_dir: Path, out: Path, quantized: bool) -> str:
    """A fresh LoRA adapter on `base_dir`, saved (run in a child: call_in_child)."""
    from qlora_ops.tasks.model.modeling import add_lora, load_model
    from qlora_ops.tasks.core.util import atomic_dir

    model, _ = load_model(Path(base_dir), params, quantized=quantized)
    model = add_lora(model, params, quantized)
    with atomic_dir(Path(out)) as tmp:
        model.save_pretrained(tmp)
    return str(out)


def imports_only(params, module: str) -> int:
    """The after-import RSS of a child that imports `module` (a stage's baseline)."""
    import importlib

    importlib.import_module(module)
    return psutil.Process().memory_info().rss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state", default=None, help="state dir (default: the workspace's .qlora-ops)")
    ap.add_argument("--rows", type=int, default=107)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from qlora_ops.flows import model_stage  # noqa: F401  the flow's imports: the parent's baseline
    from qlora_ops.flows import prefect_tasks as pt
    from qlora_ops.tasks.core import memory
    from qlora_ops.tasks.core.child import call_in_child
    from qlora_ops.tasks.core.config import Params
    from qlora_ops.tasks.model import base as B

    parent = psutil.Process().memory_info().rss
    p = Params(state_dir=a.state or str(ROOT / ".qlora-ops"), eval={"max_new_tokens": 8})
    rows_out: list[tuple[str, float, float | None, str]] = []

    def child(name: str, fn, *args, why: str = "", base_mod: str | None = None, **kw):
        n = len(memory._child_peaks)
        t = time.time()
        out = fn(*args, **kw)
        peak = max(memory._child_peaks[n:], default=0) / 2**20
        imp = None
        if base_mod:
            imp = call_in_child("bench.stage_memory:imports_only", p, base_mod) / 2**20
        rows_out.append((name, peak, imp, why))
        print(f"  {name}: {peak:.0f} MiB ({time.time() - t:.0f} s)", file=sys.stderr, flush=True)
        return out

    ws = ROOT
    # fresh conversion and 4-bit copy in a temp state dir, so both really run
    with tempfile.TemporaryDirectory(prefix="stage-memory-") as tmp:
        tmp = Path(tmp)
        fresh = Params(state_dir=str(tmp / "state"), eval={"max_new_tokens": 8})
        base = child("base_model (GGUF -> safetensors)", B.resolve_base_model, fresh, ws,
                     why="one fp32 copy (540 MB) + GGUF dequantization transients", base_mod="transformers")
        qbase = child("quantize_base", B.quantized_base, fresh, ws, base,
                      why="fp32 file read + NF4 copy", base_mod="qlora_ops.tasks.model.modeling")
        rows = [{"id": f"r{i}", "system": p.data.system_prompt,
                 "prompt": f"Which stdlib module does this belong to? {'Return the value of x. ' * 6}{i}",
                 "completion": "os.path"} for i in range(a.rows)]
        (tmp / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        lora = call_in_child("bench.stage_memory:make_adapter", fresh, base, tmp / "ad-lora", False)
        qlora = call_in_child("bench.stage_memory:make_adapter", fresh, qbase, tmp / "ad-qlora", True)
        ev = lambda name, d, **kw: pt.evaluate_model.fn(fresh, name, str(d), str(tmp / "test.jsonl"),  # noqa: E731
                                                         str(tmp / f"ev-{name}"), **kw)
        pred = "qlora_ops.tasks.evaluate.predict"
        child("eval_base", ev, "base", base, why="fp32 model (540 MB) + generation", base_mod=pred)
        child("eval_lora", ev, "lora", base, adapter_dir=lora, why="fp32 model + LoRA", base_mod=pred)
        child("eval_qlora", ev, "qlora", qbase, adapter_dir=qlora, quantized=True,
              why="NF4 load, linears dequantized once to fp32 + LoRA", base_mod=pred)
        child("merge", pt.merge_adapter.fn, fresh, str(base), qlora, str(tmp / "merged"), str(qbase),
              why="fp32 base + NF4 copy dequantized into it + merged save", base_mod="qlora_ops.tasks.model.merge")
        child("eval_merged", ev, "merged", tmp / "merged", as_saved=True, why="the merged fp32 model alone",
              base_mod=pred)
    alloc = "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "glibc"
    print(f"\nallocator: {alloc}; parent (the flow's process) after imports: {parent / 2**20:.0f} MiB, "
          f"its own peak so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print("| stage | child peak MiB | child after imports MiB | above imports MiB | where it comes from |")
    print("|---|---|---|---|---|")
    for name, peak, imp, why in rows_out:
        print(f"| {name} | {peak:.0f} | {imp:.0f} | {peak - imp:.0f} | {why} |" if imp else f"| {name} | {peak:.0f} | | | {why} |")
    print(f"max child peak / 1200 MiB: {max(r[1] for r in rows_out) / 1200:.2f}")


if __name__ == "__main__":
    main()
