"""Our training stage vs a minimal plain transformers + peft + bitsandbytes loop, and QLoRA vs LoRA
memory, in one run, on two configs (same model, data, batch, steps for every row of a config):

  default  the default task (data/prepared/default, built if missing), max_seq_len 128, batch 8, r 16
  cls256   a synthetic 2,800-row, 5-label classification file, max_seq_len 256, batch 8, r 8

    python bench/plain_vs_ours.py                   # the whole table (SmolLM2-135M, CPU or GPU)
    python bench/plain_vs_ours.py --tiny --steps 2  # smoke run (tests use this)

Every run is its own process (ours through tasks.train.process, exactly as the flow runs it), so
each peak is that run's alone: ru_maxrss on CPU, CUDA max allocated on GPU. "increment" is the peak
minus the process's RSS after imports, before any model is built. The plain loop is the usual recipe:
prepare_model_for_kbit_training (gradient checkpointing on, its default), right padding, labels with
-100 on the prompt, the model's own loss over full-vocabulary logits at every position, torch AdamW,
glibc's allocator; it trains on the very rows ours trains on at each step (tasks.train.batches.batch_order).
Ours runs as the flow runs it: QLoRA on the 4-bit copy of the base (made once, before the runs), the
child's allocator chosen by tasks.train.process.child_env (jemalloc where the machine has it).
Ours and plain run one after the other for each kind, so their tokens/s ratio shares the machine's
conditions; absolute tokens/s on a shared machine are noise. Writes bench/out/plain_vs_ours.json.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LABELS = ["billing", "shipping", "account", "technical", "returns"]
CUES = {"billing": "invoice charge refund VAT", "shipping": "parcel courier delivery tracking",
        "account": "password login profile email", "technical": "error crash install update",
        "returns": "return exchange broken replace"}


def cls_data(d: Path, n: int, words: int, seed: int = 0) -> Path:
    """Long ticket-like inputs whose label is given away by a few cue words among filler."""
    rng = random.Random(seed)
    filler = [f"w{i}" for i in range(400)]
    d.mkdir(parents=True, exist_ok=True)
    for split, m in (("train", n), ("val", max(8, n // 50))):
        with open(d / f"{split}.jsonl", "w") as f:
            for i in range(m):
                lab = LABELS[rng.randrange(len(LABELS))]
                text = [rng.choice(filler) for _ in range(rng.randint(words // 2, words))]
                for cue in CUES[lab].split():
                    text.insert(rng.randrange(len(text) + 1), cue)
                f.write(json.dumps({"id": f"{split}-{i}", "system": "Answer with the label only.",
                                    "prompt": "Route this ticket: " + " ".join(text), "completion": lab}) + "\n")
    return d


def default_data() -> Path:
    from qlora_ops.tasks.core.config import Params
    from qlora_ops.tasks.data.prepare import prepare
    from qlora_ops.tasks.data.samples import build_sample

    d = ROOT / "data" / "prepared" / "default"
    if not (d / "train.jsonl").is_file():
        if not (raw := ROOT / Params().data.raw).is_file():  # a fresh clone: the dvc `sample` stage's output
            build_sample(raw)
        prepare(Params(), ROOT)
    return d


def params_for(model: Path, cfg: dict, steps: int) -> dict:
    return {"model": {"source": str(model), "max_seq_len": cfg["max_seq_len"]}, "lora": {"r": cfg["r"], "alpha": 2 * cfg["r"]},
            "training": {"max_steps": steps, "batch_size": cfg["batch_size"], "eval_every": 10_000,
                         "save_every": 10_000, "warmup_steps": 0, "threads": cfg.get("threads")}}


def steady(tps: list[float]) -> float:
    s = tps[1:] or tps  # the first step pays for warm-up
    return sum(s) / len(s)


def run_ours(p: dict, model: Path, data: Path, kind: str, out: Path) -> dict:
    from qlora_ops.tasks.core.config import Params
    from qlora_ops.tasks.train.process import train_subprocess

    params = Params.model_validate(p)
    if kind == "qlora":  # as the flow runs it: on the 4-bit copy of the base, made once beforehand
        from qlora_ops.tasks.model.base import quantized_base
        model = quantized_base(params, out.parent, model)
    res = train_subprocess(params, model, data, out, kind, on_log=lambda s: None)
    hist = [json.loads(l) for l in (out / "history.jsonl").read_text().splitlines()]
    return {"peak": res["process_peak_bytes"], "after_import": res["after_import_rss_bytes"],
            "tokens_per_s": steady([h["tokens_per_s"] for h in hist]), "final_train_loss": res["final_train_loss"],
            "allocator": res.get("allocator")}


def run_plain(p: dict, model: Path, data: Path, kind: str, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(p))
    r = subprocess.run([sys.executable, __file__, "--plain-child", str(out), "--kind", kind, "--model", str(model),
                        "--data", str(data)], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"plain {kind} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return json.loads((out / "plain.json").read_text())


def plain_child(out: Path, kind: str, model_dir: Path, data: Path) -> None:
    """The minimal loop, the way the libraries' docs put it together."""
    import psutil
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from qlora_ops.tasks.core.config import Params
    from qlora_ops.tasks.core.memory import process_peak_bytes
    from qlora_ops.tasks.model.prompting import encode
    from qlora_ops.tasks.train.batches import batch_order
    from qlora_ops.tasks.core.util import read_jsonl

    after_import = psutil.Process().memory_info().rss
    p = json.loads((out / "params.json").read_text())
    tp, msl = p["training"], p["model"]["max_seq_len"]
    defaults = Params.model_validate(p)  # lr and seed as ours gets them (params_for leaves them at their defaults)
    if tp.get("threads"):
        torch.set_num_threads(tp["threads"])
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    kw = {}
    if kind == "qlora":
        kw = dict(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                         bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype),
                  device_map={"": 0 if cuda else "cpu"})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kw)
    dev = torch.device("cuda" if cuda else "cpu")
    if kind == "qlora":
        model = prepare_model_for_kbit_training(model)
    else:
        model.to(dev)
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    torch.manual_seed(42)
    model = get_peft_model(model, LoraConfig(r=p["lora"]["r"], lora_alpha=p["lora"]["alpha"], lora_dropout=0.05,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = [encode(tok, r, msl) for r in read_jsonl(data / "train.jsonl")]
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=defaults.training.lr)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model.train()
    tps = []
    bs = tp["batch_size"]
    for step in range(tp["max_steps"]):
        t = time.time()
        batch = [rows[i] for i in batch_order(len(rows), step, bs, defaults.seed)]  # the very rows ours trains on per step
        T = max(len(x) for x, _ in batch)
        ids = torch.tensor([x + [pad] * (T - len(x)) for x, _ in batch], device=dev)
        labels = torch.tensor([y + [-100] * (T - len(y)) for _, y in batch], device=dev)
        mask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x, _ in batch], device=dev)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tps.append(int(mask.sum()) / (time.time() - t))
    peak = int(torch.cuda.max_memory_allocated()) if cuda else process_peak_bytes()
    (out / "plain.json").write_text(json.dumps({"peak": peak, "after_import": after_import, "tokens_per_s": steady(tps),
                                                "final_train_loss": float(loss), "allocator": "glibc"}))


def done(cname: str, run: str, r: dict) -> None:
    """One line per finished run, as it finishes (a long bench leaves its figures even if stopped)."""
    x = r[run]
    print(f"done {cname} {run}: peak {x['peak'] / 2**20:.0f} MiB, after imports {x['after_import'] / 2**20:.0f} MiB, "
          f"{x['tokens_per_s']:.1f} tokens/s, loss {x['final_train_loss']:.3f}, allocator {x.get('allocator')}", flush=True)


CONFIGS = {"default": {"max_seq_len": 128, "batch_size": 8, "r": 16, "threads": 2},
           "cls256": {"max_seq_len": 256, "batch_size": 8, "r": 8, "threads": 2, "rows": 2800, "words": 260}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama, small data (smoke test)")
    ap.add_argument("--steps", type=int, default=10, help="steps per run, default config")
    ap.add_argument("--cls-steps", type=int, default=5, help="steps per run, cls256")
    ap.add_argument("--configs", default="default,cls256")
    ap.add_argument("--plain-on", default="default,cls256", help="configs that also run the plain loop")
    ap.add_argument("--kinds", default="qlora,lora")
    ap.add_argument("--plain-child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.plain_child:
        return plain_child(a.plain_child, a.kind, a.model, a.data)
    t0 = time.time()
    results: dict = {}
    with tempfile.TemporaryDirectory() as t:
        work = Path(t)
        if a.tiny:
            sys.path.insert(0, str(ROOT / "bench"))
            from train_throughput import TINY, build_model
            model, name = build_model(TINY, work / "model"), "tiny llama"
        else:
            from qlora_ops.tasks.model.base import resolve_base_model
            from qlora_ops.tasks.core.config import Params
            model, name = resolve_base_model(Params(), ROOT), "SmolLM2-135M-Instruct"
        for cname in a.configs.split(","):
            cfg = CONFIGS[cname]
            if cname == "default" and not a.tiny:
                data = default_data()
            else:
                data = cls_data(work / f"data-{cname}", 64 if a.tiny else cfg.get("rows", 2800), 20 if a.tiny else cfg.get("words", 40))
            steps = a.steps if cname == "default" else a.cls_steps
            p = params_for(model, cfg, steps)
            r = results[cname] = {"steps": steps, **{k: v for k, v in cfg.items()}}
            for kind in a.kinds.split(","):  # ours then plain, per kind: the tokens/s ratio shares conditions
                r[f"ours_{kind}"] = run_ours(p, model, data, kind, work / f"{cname}-ours-{kind}")
                done(cname, f"ours_{kind}", r)
                if cname in a.plain_on.split(","):
                    r[f"plain_{kind}"] = run_plain(p, model, data, kind, work / f"{cname}-plain-{kind}")
                    done(cname, f"plain_{kind}", r)
    print(f"model: {name}   {time.strftime('%Y-%m-%d %H:%M')}   wall {time.time() - t0:.0f} s")
    print(f"{'config':<9}{'run':<13}{'peak MiB':>10}{'after-import':>14}{'increment':>11}{'tokens/s':>10}{'loss':>8}")
    mib = 2 ** 20
    for cname, r in results.items():
        for run in ("ours_qlora", "plain_qlora", "ours_lora", "plain_lora"):
            if run not in r:
                continue
            x = r[run]
            print(f"{cname:<9}{run:<13}{x['peak'] / mib:>10.0f}{x['after_import'] / mib:>14.0f}"
                  f"{(x['peak'] - x['after_import']) / mib:>11.0f}{x['tokens_per_s']:>10.1f}{x['final_train_loss']:>8.3f}")
        if "ours_qlora" not in r or "ours_lora" not in r:
            continue
        q, l = r["ours_qlora"], r["ours_lora"]
        r["ratios"] = {"qlora_over_lora_peak": q["peak"] / l["peak"],
                       "qlora_over_lora_increment": (q["peak"] - q["after_import"]) / (l["peak"] - l["after_import"]),
                       **({"ours_over_plain_tokens_per_s_qlora": q["tokens_per_s"] / r["plain_qlora"]["tokens_per_s"],
                           "ours_over_plain_tokens_per_s_lora": l["tokens_per_s"] / r["plain_lora"]["tokens_per_s"]}
                          if "plain_qlora" in r else {})}
        print(f"{cname:<9}ratios: " + "  ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items()))
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "plain_vs_ours.json").write_text(json.dumps({"model": name, "args": {k: str(v) for k, v in vars(a).items()},
                                                        "results": results}, indent=2))


if __name__ == "__main__":
    main()
