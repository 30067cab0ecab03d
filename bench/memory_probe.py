"""Where a training process's memory goes: RSS after imports, after the model load, after adding
LoRA, and the peak of each forward and each step (a 5 ms psutil sampler), on the default data.

    python bench/memory_probe.py qlora --gc --steps 2      # SmolLM2-135M, default params, batch 8
    MALLOC_MMAP_THRESHOLD_=65536 python bench/memory_probe.py qlora --no-gc
    python bench/memory_probe.py qlora --tiny --steps 2   # smoke run (tests use this): tiny random Llama

Runs in this process (start it fresh for each figure). Needs data/prepared/default and the converted
base (any `qlora-ops run`, or bench/plain_vs_ours.py, makes both). bench/RESULTS.md has its figures.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
P = psutil.Process()
peak = [0]


def sampler() -> None:
    while True:
        peak[0] = max(peak[0], P.memory_info().rss)
        time.sleep(0.005)


def mark(tag: str) -> None:
    time.sleep(0.02)
    r = P.memory_info().rss
    print(f"{tag:<28} rss {r / 2**20:7.0f} MiB   peak since last line {peak[0] / 2**20:7.0f} MiB", flush=True)
    peak[0] = r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["qlora", "lora"])
    ap.add_argument("--gc", action=argparse.BooleanOptionalAction, default=True, help="gradient checkpointing")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--trim", action="store_true", help="malloc_trim after every step (tasks.core.memory.release_memory)")
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama and synthetic rows in a temp dir")
    ap.add_argument("--nf4", action=argparse.BooleanOptionalAction, default=True,
                    help="QLoRA loads the cached 4-bit copy of the base, as the flow does (--no-nf4: quantize on load)")
    a = ap.parse_args()
    threading.Thread(target=sampler, daemon=True).start()
    import torch

    from qlora_ops.tasks.train import batches as B, loop as T
    from qlora_ops.tasks.core.config import Params
    from qlora_ops.tasks.core.memory import release_memory
    from qlora_ops.tasks.model.modeling import add_lora, load_model
    from qlora_ops.tasks.model.prompting import encode
    from qlora_ops.tasks.core.util import read_jsonl
    mark("imports")
    p = Params(training={"gradient_checkpointing": a.gc, "threads": 2})
    torch.set_num_threads(2)
    dev = torch.device("cpu")
    base, ws, data = ROOT / ".qlora-ops/cache/base/smollm2-135m-instruct", ROOT, ROOT / "data/prepared/default"
    if a.tiny:
        import atexit
        import shutil
        import tempfile

        sys.path.insert(0, str(ROOT / "bench"))
        from plain_vs_ours import cls_data
        from train_throughput import TINY, build_model
        ws = Path(tempfile.mkdtemp(prefix="memory-probe-"))
        atexit.register(shutil.rmtree, ws, ignore_errors=True)
        base, data = build_model(TINY, ws / "model"), cls_data(ws / "data", 64, 20)
    if a.kind == "qlora" and a.nf4:
        from qlora_ops.tasks.model.base import quantized_base
        base = quantized_base(p, ws, base)  # made once (its own peak), then only read
        release_memory()
        peak[0] = 0
        mark("4-bit copy ready")
    model, tok = load_model(base, p, a.kind == "qlora", dev)
    mark("model loaded")
    model = add_lora(model, p, a.kind == "qlora")
    mark("LoRA added")
    rows = [encode(tok, r, p.model.max_seq_len) for r in read_jsonl(data / "train.jsonl")]
    opt, _ = T.make_optimizer(model, p, dev)
    model.train()
    for s in range(a.steps):
        b = B.make_batch([rows[i] for i in B.batch_order(len(rows), s, 8, p.seed)], tok.pad_token_id, p)
        t = time.time()
        loss, _ = B.batch_loss(model, b, dev)
        mark(f"forward {s} (T={b['input_ids'].shape[1]}, K={b['keep']})")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if a.trim:
            release_memory()
        mark(f"step {s} ({time.time() - t:.1f} s)")


if __name__ == "__main__":
    main()
