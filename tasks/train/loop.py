"""Train stage: QLoRA (4-bit NF4 base + LoRA) or the full-precision LoRA baseline, one plain loop.

    python -m tasks.train.loop --params params/default.yaml --kind qlora \
        --base-dir .qlora-ops/cache/base/smollm2-135m-instruct --data-dir data/prepared/default --out /tmp/run-q

Both kinds share every setting (data order, seed, LoRA init, schedule) except quantization.
Building the model (device, dtype, 4-bit config, LoRA init) is tasks.model.modeling's: evaluate and merge
must load exactly what was trained, so that code is not this module's.
Crash safety: checkpoints (adapter, optimizer, scheduler, RNG, step) are written to a temp dir and
renamed, so a directory named step-N is always complete; a re-run resumes from the newest one.
`result.json` is written last; its presence means the run finished.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Literal

import torch

from qlora_ops.tasks.core.config import Params, load_params
from qlora_ops.tasks.train.distributed import Dist, check_launch, prepare_for_fsdp
from qlora_ops.tasks.core.memory import process_peak_bytes
from qlora_ops.tasks.model.modeling import DivergenceError, add_lora, check_finite, compute_dtype, device, load_model
from qlora_ops.tasks.model.prompting import encode
from qlora_ops.tasks.core.util import atomic_dir, atomic_write_json, read_json, read_jsonl, verify_manifest, write_manifest

log = logging.getLogger("qlora_ops.train")
Kind = Literal["qlora", "lora"]


# ---------------------------------------------------------------- optimizer
def optimizer_name(params: Params, dev: torch.device) -> str:
    name = params.training.optimizer
    if name == "auto":
        name = "paged_adamw_32bit"
    if name.startswith("paged") and dev.type != "cuda":
        # paged optimizers page their state to host memory under GPU memory pressure: CUDA only
        return "adamw_torch (cpu fallback)"
    return name


def make_optimizer(model, params: Params, dev: torch.device):
    tp = params.training
    trainable = [p for p in model.parameters() if p.requires_grad]
    name = optimizer_name(params, dev)
    if name.endswith("(cpu fallback)"):
        log.warning("optimizer %s needs CUDA; CPU fallback: torch AdamW", tp.optimizer)
    if name == "paged_adamw_32bit":
        import bitsandbytes as bnb
        return bnb.optim.PagedAdamW(trainable, lr=tp.lr, weight_decay=tp.weight_decay), name
    if name == "paged_adamw_8bit":
        import bitsandbytes as bnb
        return bnb.optim.PagedAdamW8bit(trainable, lr=tp.lr, weight_decay=tp.weight_decay), name
    return torch.optim.AdamW(trainable, lr=tp.lr, weight_decay=tp.weight_decay), name


# ---------------------------------------------------------------- data
def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """Left-pad, so every completion ends at the last position: the loss then needs logits for
    the last K positions only (the LM head over the whole sequence is ~20% of a step)."""
    T = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, T - len(x):] = torch.tensor(x)
        labels[i, T - len(y):] = torch.tensor(y)
        mask[i, T - len(x):] = 1
    first = (labels != -100).float().argmax(dim=1)  # first completion position per row
    keep = int(T - first.min().item()) + 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "keep": min(keep, T)}


def collate_packed(examples: list[tuple[list[int], list[int]]], pad_id: int, max_len: int) -> dict:
    """Pack examples first-fit into rows of <= max_len tokens. Position ids restart at 0 for each
    example and no 2D mask is passed, so transformers builds a block-diagonal causal mask from the
    position ids: no token attends across an example boundary."""
    rows: list[list[tuple[list[int], list[int]]]] = []
    for ex in sorted(examples, key=lambda e: -len(e[0])):
        row = next((r for r in rows if sum(len(x) for x, _ in r) + len(ex[0]) <= max_len), None)
        if row is None:
            rows.append(row := [])
        row.append(ex)
    T = max(sum(len(x) for x, _ in r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    pos = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        at = 0
        for x, y in r:
            ids[i, at:at + len(x)] = torch.tensor(x)
            labels[i, at:at + len(y)] = torch.tensor(y)
            pos[i, at:at + len(x)] = torch.arange(len(x))
            at += len(x)
        pos[i, at:] = torch.arange(T - at)  # padding is one more "sequence", never in the loss
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": None, "keep": T}


def _targets(labels: torch.Tensor, K: int) -> torch.Tensor:
    """The labels the last K positions' logits predict (the loss's targets)."""
    return labels[:, -K + 1:] if K > 1 else labels[:, :0]


def completion_tokens(batch: dict) -> int:
    """Number of tokens the loss of `batch` is taken over, known before the forward pass."""
    return int((_targets(batch["labels"], batch["keep"]) != -100).sum())


def token_loss(model, batch: dict, dev: torch.device) -> tuple[torch.Tensor, int]:
    """(sum of the completion tokens' cross-entropy, their number)."""
    ids, labels, K = batch["input_ids"].to(dev), batch["labels"].to(dev), batch["keep"]
    if batch["attention_mask"] is None:  # packed
        mask, pos = None, batch["position_ids"].to(dev)
    else:
        mask = batch["attention_mask"].to(dev)
        pos = (mask.cumsum(1) - 1).clamp(min=0)  # positions as generate() computes them for left padding
    # use_cache=False: no KV cache in training (and with a cache, packed-sequence masking is skipped)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=K, use_cache=False).logits
    tgt = _targets(labels, K)
    n = int((tgt != -100).sum())
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), tgt.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss, n


def batch_loss(model, batch: dict, dev: torch.device) -> tuple[torch.Tensor, int]:
    """(mean cross-entropy over the batch's completion tokens, their number)."""
    loss, n = token_loss(model, batch, dev)
    return loss / max(n, 1), n


def make_batch(examples: list, pad_id: int, params: Params) -> dict:
    if params.training.packing:
        return collate_packed(examples, pad_id, params.model.max_seq_len)
    return collate(examples, pad_id)


BUCKET_WINDOW = 16  # batches per window that is sorted by length (wide enough to group, narrow enough to mix)


def epoch_order(n_rows: int, epoch: int, seed: int, lengths: list[int] | None = None, batch_size: int = 1) -> list[int]:
    """One epoch's row order. With `lengths`, length-bucketed: shuffle, sort each window of
    BUCKET_WINDOW batches by length, cut it into batches and shuffle the batches, so a batch holds
    rows of similar length (less padding) while the epoch stays a seeded shuffle."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_rows, generator=g).tolist()
    if not lengths:
        return perm
    w = BUCKET_WINDOW * batch_size
    ordered = [i for a in range(0, n_rows, w) for i in sorted(perm[a:a + w], key=lambda i: -lengths[i])]
    # Micro-batches run on across epochs: cut where this epoch's batches really start and end, and
    # shuffle only the whole batches, so the head and tail (shared with the epochs around) stay put.
    head = (-epoch * n_rows) % batch_size
    cuts = list(range(head, n_rows - batch_size + 1, batch_size))
    batches = [ordered[a:a + batch_size] for a in cuts]
    tail = ordered[cuts[-1] + batch_size:] if cuts else ordered[head:]
    return ordered[:head] + [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]] + tail


def batch_order(n_rows: int, micro: int, batch_size: int, seed: int, lengths: list[int] | None = None) -> list[int]:
    """Row indices of micro-batch number `micro`: a pure function of (seed, position[, lengths]), so a
    resumed run sees exactly the batches an uninterrupted run would."""
    start = micro * batch_size
    out, orders = [], {}
    for k in range(start, start + batch_size):
        epoch, off = divmod(k, n_rows)
        if epoch not in orders:
            orders[epoch] = epoch_order(n_rows, epoch, seed, lengths, batch_size)
        out.append(orders[epoch][off])
    return out


# ---------------------------------------------------------------- checkpoints
STEP_RE = re.compile(r"^step-(\d+)$")


def _adapter_state(model, full: dict | None = None) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict
    sd = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model, state_dict=full).items()}
    if not sd:  # an adapter file without weights would load as "no change" everywhere downstream
        raise RuntimeError("the adapter state dict is empty: no LoRA weight was found in the model's state dict")
    return sd


def _rank_file(rank: int) -> str:
    return "trainer_state.pt" if rank == 0 else f"trainer_state.rank{rank}.pt"


def save_checkpoint(ckpt_root: Path, step: int, model, opt, sched, extra: dict, keep_last: int, dist: Dist,
                    scaler=None) -> Path:
    """Adapter (main rank) + each rank's optimizer/scheduler/RNG state, into a temp dir renamed at the end."""
    full = dist.full_state_dict(model)  # collective under FSDP
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".tmp-step-{step:06d}"
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng}
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    torch.save(state, tmp / _rank_file(dist.rank))
    dist.barrier()
    if dist.main:
        with dist.plain_tree(model) as unwrapped:
            sd = _adapter_state(unwrapped, full)
            check_finite(sd, f"checkpoint at step {step}")  # safetensors happily stores NaN: refuse here
            unwrapped.save_pretrained(tmp, state_dict=full)  # adapter_model.safetensors + adapter_config.json
        atomic_write_json(tmp / "checkpoint.json", {"step": step, "world_size": dist.world, **extra})
        write_manifest(tmp)  # sha256 + size of every file: a later truncation is caught before resuming
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # atomic: a step-N dir is complete or absent
        for old in sorted(checkpoints(ckpt_root))[:-keep_last]:
            shutil.rmtree(ckpt_root / f"step-{old:06d}", ignore_errors=True)
    dist.barrier()
    return final


def checkpoints(ckpt_root: Path) -> list[int]:
    if not ckpt_root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in ckpt_root.iterdir() if (m := STEP_RE.match(p.name)) and (p / "checkpoint.json").is_file())


def find_checkpoint(ckpt_root: Path, model, dist: Dist, say) -> tuple[int, dict | None]:
    """Newest complete checkpoint that loads cleanly: adapter weights go into the (unwrapped) model
    now; this rank's trainer state is returned to apply after the optimizer is prepared."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    for step in reversed(checkpoints(ckpt_root)):
        path = ckpt_root / f"step-{step:06d}"
        try:
            if (bad := verify_manifest(path)) is not None:  # the newest dir may be truncated: never load it
                raise ValueError(bad)
            meta = read_json(path / "checkpoint.json")
            if meta.get("world_size", 1) != dist.world:
                raise ValueError(f"written by {meta.get('world_size', 1)} processes, this run has {dist.world}")
            sd = load_file(path / "adapter_model.safetensors")
            check_finite(sd, str(path))
            # weights_only=True: tensors and plain containers only, no arbitrary unpickling.
            state = torch.load(path / _rank_file(dist.rank), weights_only=True)
            set_peft_model_state_dict(model, sd)
            say(f"resuming from checkpoint step {step} ({path})")
            return step, state
        except Exception as e:  # a damaged checkpoint: say so and try the one before
            say(f"checkpoint step {step} unusable ({e}); trying an older one")
    return 0, None


def apply_trainer_state(state: dict, opt, sched, scaler=None) -> None:
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(_to_tuple(state["rng"]["python"]))
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(i) for i in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------- metrics
def peak_memory(dev: torch.device, state: dict) -> int:
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    import psutil
    state["rss"] = max(state.get("rss", 0), psutil.Process().memory_info().rss)
    return state["rss"]


@torch.no_grad()
def val_loss(model, val: list, pad_id: int, bs: int, dev: torch.device) -> float:
    was = model.training
    model.eval()
    # bitsandbytes permanently repacks a Linear4bit's weight for a faster CPU kernel the first time it
    # runs in eval mode without grad; later training steps would then run different numerics, and a
    # resumed run would no longer match an uninterrupted one. Keep those layers in train mode (no dropout there).
    for m in model.modules():
        if type(m).__name__ == "Linear4bit":
            m.train()
    tot, n = 0.0, 0
    for i in range(0, len(val), bs):
        loss, k = batch_loss(model, collate(val[i:i + bs], pad_id), dev)
        tot += float(loss) * k
        n += k
    model.train(was)
    return tot / max(n, 1)


# ---------------------------------------------------------------- the loop
def train(params: Params, base_dir: Path, data_dir: Path, out_dir: Path, kind: Kind,
          on_log: Callable[[str], None] | None = None) -> dict:
    """Train one adapter into out_dir/adapter. Resumes from out_dir/checkpoints; returns result.json's dict."""
    out_dir = Path(out_dir)
    if (out_dir / "result.json").is_file():
        if (bad := verify_manifest(out_dir / "adapter")) is None:
            (on_log or log.info)(f"[{kind}] finished run found in {out_dir}: reusing it")
            return read_json(out_dir / "result.json")
        # A damaged final adapter is never reused: train again (from the last sound checkpoint).
        (on_log or log.info)(f"[{kind}] final adapter {out_dir / 'adapter'} is damaged ({bad}); rebuilding it")
        (out_dir / "result.json").unlink()
    tp = params.training
    check_launch(params, kind)  # batch smaller than the world, uint8 storage under FSDP: refused before any model
    if tp.threads:
        torch.set_num_threads(tp.threads)
    dist = Dist()
    dev = dist.device(device())
    quantized = kind == "qlora"
    t0 = time.time()

    def say(msg: str) -> None:
        if dist.main:
            (on_log or log.info)(f"[{kind}] {msg}")

    torch.manual_seed(params.seed)
    random.seed(params.seed)
    # The libraries the loop uses are imported before the baseline is taken, as bench/plain_vs_ours.py's
    # plain loop does: the increment over it is then the training's, not the imports' (~230 MiB).
    import peft  # noqa: F401
    import psutil
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    after_import_rss = psutil.Process().memory_info().rss  # what the process holds before any model is built
    model, tok = load_model(base_dir, params, quantized, dev)
    weight_bytes = int(model.get_memory_footprint())
    model = add_lora(model, params, quantized)
    if dist.fsdp:  # one dtype per flattened FSDP unit: the 4-bit storage dtype (quantization.quant_storage)
        prepare_for_fsdp(model, getattr(torch, params.quantization.quant_storage) if quantized else compute_dtype(params.quantization, dev))
    fp16 = compute_dtype(params.quantization, dev) == torch.float16
    if fp16:  # loss scaling unscales gradients into fp32 master weights (GradScaler refuses fp16 ones)
        for p in model.parameters():
            if p.requires_grad and p.dtype == torch.float16:
                p.data = p.data.float()
    n_train, n_all = model.get_nb_trainable_parameters()  # counts packed 4-bit weights at their real size
    msl = params.model.max_seq_len
    try:
        train_rows = [encode(tok, r, msl) for r in read_jsonl(Path(data_dir) / "train.jsonl")]
        val_rows = [encode(tok, r, msl) for r in read_jsonl(Path(data_dir) / "val.jsonl")]
    except ValueError as e:  # a completion longer than model.max_seq_len: bad data or params (exit 2), not a crash
        from qlora_ops.tasks.data.prepare import DataError
        raise DataError(f"{data_dir}: {e}") from None
    total = tp.max_steps if tp.epochs is None else math.ceil(tp.epochs * len(train_rows) / (tp.batch_size * tp.grad_accum))
    pad = tok.pad_token_id
    lengths = [len(x) for x, _ in train_rows] if tp.length_bucketing else None

    ckpt_root = out_dir / "checkpoints"
    hist_path = out_dir / "history.jsonl"
    start, state = find_checkpoint(ckpt_root, model, dist, say)  # adapter weights load before wrapping
    resumed_from = start or None
    opt_name = optimizer_name(params, dev)
    model, opt = dist.prepare(model, lambda m: make_optimizer(m, params, dev)[0])
    from transformers import get_scheduler
    sched = get_scheduler(tp.lr_scheduler, opt, num_warmup_steps=tp.warmup_steps, num_training_steps=total)
    scaler = dist.grad_scaler(dev, enabled=fp16)  # disabled (bf16/fp32): every call is a pass-through
    if state is not None:
        apply_trainer_state(state, opt, sched, scaler)
    layout, rank_steps = dist.layout(model), []

    hist = None
    if dist.main:
        history = read_jsonl(hist_path) if hist_path.is_file() else []
        history = [h for h in history if h["step"] <= start]  # drop what the crashed run logged after its checkpoint
        out_dir.mkdir(parents=True, exist_ok=True)
        hist_path.write_text("".join(json.dumps(h) + "\n" for h in history))
        hist = hist_path.open("a")

    say(f"device={dev.type} processes={dist.world} optimizer={opt_name} trainable={n_train}/{n_all} "
        f"({100 * n_train / n_all:.2f}%) weight_bytes={weight_bytes} train_rows={len(train_rows)} steps={total}")
    mem: dict = {}
    model.train()
    vl = None
    from qlora_ops.tasks.core.progress import progress
    bar = progress(total, f"train {kind}", unit="step", initial=start) if dist.main else None
    for step in range(start + 1, total + 1):
        ts = time.time()
        batches = [make_batch([train_rows[i] for i in dist.shard(batch_order(len(train_rows), (step - 1) * tp.grad_accum + a,
                                                                           tp.batch_size, params.seed, lengths))], pad, params)
                   for a in range(tp.grad_accum)]
        # The step's loss is the mean over every completion token of the step (all micro-batches, all
        # ranks), so any world size and any grad_accum give the single-process update: each micro-batch's
        # summed loss is divided by that count over the world size, because DDP and FSDP average the
        # ranks' gradients. One process with grad_accum 1: loss_sum / n, the arithmetic it always was.
        denom = max(dist.sum(sum(completion_tokens(b) for b in batches)), 1) / dist.world
        tot_loss, tokens = 0.0, 0
        for a, batch in enumerate(batches):
            with dist.no_sync(model, last=a == tp.grad_accum - 1):  # DDP: one all-reduce per optimizer step
                loss_sum, _ = token_loss(model, batch, dev)
                loss = loss_sum / denom
                if dist.any(not torch.isfinite(loss).item()):
                    raise DivergenceError(f"[{kind}] loss is {dist.mean(loss.item())} at step {step}: training diverged "
                                          f"(training.lr={tp.lr} is likely too high); nothing downstream was run")
                dist.backward(scaler.scale(loss))
            tot_loss += loss.item()
            tokens += int((batch["input_ids"] != pad).sum()) if batch["attention_mask"] is None else int(batch["attention_mask"].sum())
        scaler.unscale_(opt)  # fp16: the norm and the clipping are of the true gradients
        gn = dist.clip(model, tp.max_grad_norm)
        if dist.any(not torch.isfinite(gn).item()) and not scaler.is_enabled():
            raise DivergenceError(f"[{kind}] gradient norm is {float(gn)} at step {step}: training diverged "
                                  f"(lower training.lr={tp.lr}); nothing downstream was run")
        lr = sched.get_last_lr()[0]
        scale = scaler.get_scale()
        scaler.step(opt)  # fp16: skipped when a gradient overflowed; otherwise opt.step()
        scaler.update()
        skipped = scaler.get_scale() < scale  # the scaler lowers its scale exactly when it skipped the step
        if skipped and scaler.get_scale() < 1.0:
            raise DivergenceError(f"[{kind}] gradients are non-finite even at a loss scale below 1 at step {step}: "
                                  f"training diverged (lower training.lr={tp.lr}); nothing downstream was run")
        if not skipped:
            sched.step()
        opt.zero_grad(set_to_none=True)
        dt = time.time() - ts
        rec = {"step": step, "train_loss": dist.sum(tot_loss) / dist.world, "lr": lr, "grad_norm": float(gn),
               "tokens_per_s": dist.sum(tokens) / dt, "peak_mem_bytes": peak_memory(dev, mem), "time": time.time()}
        if scaler.is_enabled():
            rec.update(grad_scale=scale, skipped=skipped)
            if skipped:
                say(f"step {step}: fp16 gradients overflowed at loss scale {scale:g}; step skipped, scale now {scaler.get_scale():g}")
        rank_steps.append({"step": step, "train_loss": rec["train_loss"], "grad_norm": rec["grad_norm"]})
        if step % tp.eval_every == 0 or step == total:
            vl = rec["val_loss"] = val_loss(model, val_rows, pad, tp.batch_size, dev)
            say(f"step {step}/{total} loss={rec['train_loss']:.4f} val_loss={vl:.4f} {rec['tokens_per_s']:.0f} tok/s")
        if hist:
            hist.write(json.dumps(rec) + "\n")
            hist.flush()
        if bar is not None:
            bar.update(1, loss=rec["train_loss"], **{"tok/s": rec["tokens_per_s"]})
        if step % tp.save_every == 0 and step < total:
            save_checkpoint(ckpt_root, step, model, opt, sched, {"train_loss": rec["train_loss"]}, tp.keep_last, dist, scaler)

    if bar is not None:
        bar.close()
    if dist.world > 1:  # what each rank ran and held, and the norms it clipped by (the same on every rank)
        atomic_write_json(out_dir / "ranks" / f"rank-{dist.rank}.json", {**layout, "steps": rank_steps})
    full = dist.full_state_dict(model)  # collective under FSDP
    final = out_dir / "adapter"
    result: dict = {}
    if dist.main:
        hist.close()
        with dist.plain_tree(model) as unwrapped:
            check_finite(_adapter_state(unwrapped, full), f"[{kind}] final adapter")
            with atomic_dir(final) as tmp:
                unwrapped.save_pretrained(tmp, state_dict=full)
        hrows = read_jsonl(hist_path)
        result = {
            "kind": kind, "adapter_dir": str(final), "steps": total, "resumed_from": resumed_from,
            "final_train_loss": hrows[-1]["train_loss"], "final_val_loss": vl if vl is not None else hrows[-1].get("val_loss"),
            "trainable_params": n_train, "total_params": n_all, "trainable_share": n_train / n_all,
            "weight_bytes": weight_bytes, "optimizer": opt_name, "device": dev.type, "processes": dist.world,
            "compute_dtype": str(compute_dtype(params.quantization, dev)),
            "peak_mem_bytes": max(h["peak_mem_bytes"] for h in hrows),
            # this process's high-water mark: the training's own peak when it runs in a fresh process
            "after_import_rss_bytes": after_import_rss, "allocator": allocator(),
            "process_peak_bytes": process_peak_bytes() if dev.type == "cpu" else int(torch.cuda.max_memory_allocated()),
            "mean_tokens_per_s": sum(h["tokens_per_s"] for h in hrows) / len(hrows),
            "train_seconds": time.time() - t0, "history": str(hist_path),
        }
        atomic_write_json(out_dir / "result.json", result)  # written last: its presence means "finished"
    dist.barrier()
    return result if dist.main else read_json(out_dir / "result.json")


def allocator() -> str:
    """Which allocator this process runs on (tasks.train.process.child_env chose it)."""
    pre = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in pre:
        return f"jemalloc, MALLOC_CONF={os.environ.get('MALLOC_CONF', '')}"
    t = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    return f"glibc, MALLOC_MMAP_THRESHOLD_={t}" if t else "glibc"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", required=True)
    ap.add_argument("--kind", choices=["qlora", "lora"], required=True)
    ap.add_argument("--base-dir", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    from qlora_ops.tasks.core.util import die_with_parent_if_tied
    die_with_parent_if_tied()  # started by `qlora-ops run`: never outlive it
    from qlora_ops.tasks.core import console
    console.configure()  # as quiet (or verbose) as the parent that started this process
    if int(os.environ.get("RANK", "0")) != 0:
        logging.disable(logging.INFO)
    from qlora_ops.tasks.core.config import ParamsError
    from qlora_ops.tasks.data.prepare import DataError
    try:
        res = train(load_params(a.params), Path(a.base_dir), Path(a.data_dir), Path(a.out), a.kind, on_log=print)
    except (DivergenceError, DataError, ParamsError) as e:
        # exit code and error.json keep the class for a parent (tasks.train.process): 3 diverged, 2 bad input
        code = 3 if isinstance(e, DivergenceError) else 2
        print(f"error: {e}", file=sys.stderr)
        atomic_write_json(Path(a.out) / "error.json", {"error": type(e).__name__, "message": str(e)})
        return code
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in res.items() if k != "history"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
