"""QLoRA vs full-precision LoRA: tokens/s and peak memory, both measured in one run (ratios, not seconds).

    python bench/train_throughput.py                       # SmolLM2-135M (embedded), CPU or GPU
    python bench/train_throughput.py --llama-1b --steps 20 # random-weight 1.1B Llama from a config (GPU)
    python bench/train_throughput.py --tiny --steps 3      # smoke run (tests use this)

Each kind runs in its own subprocess so peak memory (CUDA max allocated, or process RSS on CPU)
is not polluted by the other. Prints a table and writes bench/out/throughput.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, max_position_embeddings=2048)  # TinyLlama-1.1B shape
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)


def build_model(shape: dict, out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qlora_ops.tasks.model.base import smollm2_gguf_path

    g = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **shape)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_data(d: Path, n: int, words: int) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        with open(d / f"{split}.jsonl", "w") as f:
            for i in range(n if split == "train" else 8):
                f.write(json.dumps({"id": str(i), "system": "Answer.", "prompt": " ".join(f"w{(i * 7 + j) % 97}" for j in range(words)),
                                    "completion": "ok"}) + "\n")
    return d


def run_kind(kind: str, model: Path, data: Path, steps: int, bs: int, work: Path) -> dict:
    import yaml
    params = {"model": {"source": str(model), "max_seq_len": 512},
              "training": {"max_steps": steps, "batch_size": bs, "eval_every": 10_000, "save_every": 10_000, "warmup_steps": 0}}
    pf = work / f"{kind}.yaml"
    pf.write_text(yaml.safe_dump(params))
    r = subprocess.run([sys.executable, "-m", "qlora_ops.tasks.train", "--params", str(pf), "--kind", kind, "--base-dir", str(model),
                        "--data-dir", str(data), "--out", str(work / f"run-{kind}")], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    hist = [json.loads(l) for l in (work / f"run-{kind}" / "history.jsonl").read_text().splitlines()]
    steady = hist[1:] or hist  # the first step pays for kernel warm-up
    res["steady_tokens_per_s"] = sum(h["tokens_per_s"] for h in steady) / len(steady)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--llama-1b", action="store_true")
    g.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--words", type=int, default=40, help="prompt length in words (~tokens x 1.5)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        work = Path(t)
        if a.llama_1b or a.tiny:
            model = build_model(LLAMA_1B if a.llama_1b else TINY, work / "model")
            name = "llama-1.1B (random weights)" if a.llama_1b else "tiny llama"
        else:
            from qlora_ops.tasks.model.base import resolve_base_model
            from qlora_ops.tasks.core.config import Params
            model = resolve_base_model(Params(), ROOT)
            name = "SmolLM2-135M-Instruct"
        data = write_data(work / "data", 64, a.words)
        res = {k: run_kind(k, model, data, a.steps, a.batch_size, work) for k in ("qlora", "lora")}
    q, l = res["qlora"], res["lora"]
    rows = [("tokens/s (steady)", q["steady_tokens_per_s"], l["steady_tokens_per_s"]),
            ("peak memory MiB", q["peak_mem_bytes"] / 2**20, l["peak_mem_bytes"] / 2**20),
            ("model weight MiB", q["weight_bytes"] / 2**20, l["weight_bytes"] / 2**20),
            ("trainable share %", 100 * q["trainable_share"], 100 * l["trainable_share"])]
    print(f"model: {name}   device: {q['device']}   optimizer: {q['optimizer']}   steps: {a.steps} x batch {a.batch_size}")
    print(f"{'metric':<20}{'QLoRA':>12}{'LoRA':>12}{'QLoRA/LoRA':>12}")
    for n, x, y in rows:
        print(f"{n:<20}{x:>12.1f}{y:>12.1f}{x / y:>12.2f}")
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "throughput.json").write_text(json.dumps({"model": name, "args": vars(a), "qlora": q, "lora": l}, indent=2))


if __name__ == "__main__":
    main()
