"""Train stage: QLoRA (4-bit NF4 base + LoRA) or the full-precision LoRA baseline, one plain loop.

    python -m qlora_ops.tasks.train --params params/default.yaml --kind qlora \
        --base-dir .qlora-ops/cache/base/smollm2-135m-instruct --data-dir data/prepared/default --out /tmp/run-q

Both kinds share every setting (data order, seed, LoRA init, schedule) except quantization.
Building the model (device, dtype, 4-bit config, LoRA init) is tasks.model.modeling's: evaluate and merge
must load exactly what was trained, so that code is not this module's. Which rows form each micro-batch,
their collation and the loss are tasks.train.batches'; one process or many, tasks.train.distributed's.
`train()` reads top to bottom as the recipe; its steps follow it in this file, in the order they run.
Crash safety: checkpoints (adapter, optimizer, scheduler, RNG, step; tasks.train.checkpoints) are written
to a temp dir and renamed, so a directory named step-N is always complete; a re-run resumes from the newest one.
`result.json` is written last; its presence means the run finished.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Literal, NamedTuple

import torch

from qlora_ops.tasks.core import console
from qlora_ops.tasks.core.config import Params, ParamsError, load_params
from qlora_ops.tasks.core.memory import process_peak_bytes
from qlora_ops.tasks.core.progress import progress
from qlora_ops.tasks.core.util import (atomic_dir, atomic_write_json, die_with_parent_if_tied, read_json, read_jsonl,
                                       verify_manifest)
from qlora_ops.tasks.data.prepare import DataError
from qlora_ops.tasks.model.modeling import DivergenceError, add_lora, check_finite, compute_dtype, device, load_model
from qlora_ops.tasks.model.prompting import encode
from qlora_ops.tasks.train.batches import batch_loss, batch_order, collate, completion_tokens, make_batch, token_loss
from qlora_ops.tasks.train.checkpoints import adapter_state, apply_trainer_state, find_checkpoint, save_checkpoint
from qlora_ops.tasks.train.distributed import Dist, check_launch, prepare_for_fsdp

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


def allocator() -> str:
    """Which allocator this process runs on (tasks.train.process.child_env chose it)."""
    pre = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in pre:
        return f"jemalloc, MALLOC_CONF={os.environ.get('MALLOC_CONF', '')}"
    t = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    return f"glibc, MALLOC_MMAP_THRESHOLD_={t}" if t else "glibc"


# ---------------------------------------------------------------- the loop
def train(params: Params, base_dir: Path, data_dir: Path, out_dir: Path, kind: Kind,
          on_log: Callable[[str], None] | None = None) -> dict:
    """Train one adapter into out_dir/adapter. Resumes from out_dir/checkpoints; returns result.json's dict."""
    out_dir = Path(out_dir)
    if (done := finished_run(out_dir, kind, on_log or log.info)) is not None:
        return done
    run = launch(params, kind, on_log or log.info)
    tp, dist = params.training, run.dist
    model, tok, weight_bytes = build_model(run, base_dir)
    n_train, n_all = model.get_nb_trainable_parameters()  # counts packed 4-bit weights at their real size
    rows = read_rows(tok, data_dir, params)
    total = tp.max_steps if tp.epochs is None else math.ceil(tp.epochs * len(rows.train) / (tp.batch_size * tp.grad_accum))

    ckpt_root = out_dir / "checkpoints"
    start, state = find_checkpoint(ckpt_root, model, dist, run.say)  # adapter weights load before wrapping
    model, opt, sched, scaler = build_optimizer(run, model, total)
    seed_dropout(run)  # after the (identical) model is built and wrapped, before a checkpoint's own RNG state
    if state is not None:
        apply_trainer_state(state, opt, sched, scaler)
    layout, rank_steps = dist.layout(model), []
    hist = open_history(out_dir, start) if dist.main else None
    opt_name = optimizer_name(params, run.dev)
    run.say(f"device={run.dev.type} processes={dist.world} optimizer={opt_name} trainable={n_train}/{n_all} "
            f"({100 * n_train / n_all:.2f}%) weight_bytes={weight_bytes} train_rows={len(rows.train)} steps={total}")

    mem: dict = {}  # peak_memory's running maximum
    model.train()
    vl = None
    bar = progress(total, f"train {kind}", unit="step", initial=start) if dist.main else None
    for step in range(start + 1, total + 1):
        rec = train_step(run, model, opt, sched, scaler, rows, step, mem)
        rank_steps.append({"step": step, "train_loss": rec["train_loss"], "grad_norm": rec["grad_norm"]})
        if step % tp.eval_every == 0 or step == total:
            vl = rec["val_loss"] = val_loss(model, rows.val, rows.pad, tp.batch_size, run.dev)
            run.say(f"step {step}/{total} loss={rec['train_loss']:.4f} val_loss={vl:.4f} {rec['tokens_per_s']:.0f} tok/s")
        record_step(rec, hist, bar)
        if step % tp.save_every == 0 and step < total:
            save_checkpoint(ckpt_root, step, model, opt, sched, {"train_loss": rec["train_loss"]}, tp.keep_last, dist, scaler)

    if bar is not None:
        bar.close()
    if dist.world > 1:  # what each rank ran and held, and the norms it clipped by (the same on every rank)
        atomic_write_json(out_dir / "ranks" / f"rank-{dist.rank}.json", {**layout, "steps": rank_steps})
    facts = {"trainable_params": n_train, "total_params": n_all, "trainable_share": n_train / n_all,
             "weight_bytes": weight_bytes, "optimizer": opt_name}
    return finish(run, model, out_dir, hist, total, start or None, vl, facts)


# ---------------------------------------------------------------- the steps of train(), in the order they run
def finished_run(out_dir: Path, kind: Kind, on_log: Callable[[str], None]) -> dict | None:
    """result.json's dict when out_dir holds a finished run with a sound adapter, else None."""
    if not (out_dir / "result.json").is_file():
        return None
    if (bad := verify_manifest(out_dir / "adapter")) is None:
        on_log(f"[{kind}] finished run found in {out_dir}: reusing it")
        return read_json(out_dir / "result.json")
    # A damaged final adapter is never reused: train again (from the last sound checkpoint).
    on_log(f"[{kind}] final adapter {out_dir / 'adapter'} is damaged ({bad}); rebuilding it")
    (out_dir / "result.json").unlink()
    return None


@dataclass
class Run:
    """One training's launch: params and kind, processes and device, its log, and what it started from."""
    params: Params
    kind: Kind
    dist: Dist
    dev: torch.device
    on_log: Callable[[str], None]
    t0: float  # when it started (result.json's train_seconds)
    after_import_rss: int  # what the process held before any model was built

    def say(self, msg: str) -> None:
        """Log `msg`, tagged with the kind, on the main rank only."""
        if self.dist.main:
            self.on_log(f"[{self.kind}] {msg}")

    @property
    def fp16(self) -> bool:
        """fp16 compute: trained with a loss scaler over fp32 trainable weights."""
        return compute_dtype(self.params.quantization, self.dev) == torch.float16


def launch(params: Params, kind: Kind, on_log: Callable[[str], None]) -> Run:
    """Refuse an impossible launch, join the processes, seed the RNGs and take the after-import memory baseline."""
    check_launch(params, kind)  # batch smaller than the world, uint8 storage under FSDP: refused before any model
    if params.training.threads:
        torch.set_num_threads(params.training.threads)
    dist = Dist()
    dev = dist.device(device())
    t0 = time.time()
    torch.manual_seed(params.seed)
    random.seed(params.seed)
    # The libraries the loop uses are imported before the baseline is taken, as bench/plain_vs_ours.py's
    # plain loop does: the increment over it is then the training's, not the imports' (~230 MiB).
    import peft  # noqa: F401
    import psutil
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    return Run(params, kind, dist, dev, on_log, t0, psutil.Process().memory_info().rss)


def build_model(run: Run, base_dir: Path):
    """The base (4-bit for QLoRA) with LoRA on it, as the launch needs it: (model, tokenizer, base weight bytes)."""
    params, dev, quantized = run.params, run.dev, run.kind == "qlora"
    model, tok = load_model(base_dir, params, quantized, dev)
    weight_bytes = int(model.get_memory_footprint())
    model = add_lora(model, params, quantized)
    if run.dist.fsdp:  # one dtype per flattened FSDP unit: the 4-bit storage dtype (quantization.quant_storage)
        prepare_for_fsdp(model, getattr(torch, params.quantization.quant_storage) if quantized else compute_dtype(params.quantization, dev))
    if run.fp16:  # loss scaling unscales gradients into fp32 master weights (GradScaler refuses fp16 ones)
        for p in model.parameters():
            if p.requires_grad and p.dtype == torch.float16:
                p.data = p.data.float()
    return model, tok, weight_bytes


def seed_dropout(run: Run) -> None:
    """Several processes: give each rank its own torch RNG stream, so the dropout masks of its slice of the
    batch are not the other ranks' masks over again (all ranks were seeded with `seed` so that the base and
    the LoRA init are the same everywhere). Rank-dependent and still reproducible: seed and rank decide it.
    One process: untouched, so its numbers stay bit for bit what they always were."""
    if run.dist.world > 1:
        torch.manual_seed(run.params.seed * 1_000_003 + run.dist.rank + 1)


class Rows(NamedTuple):
    """The encoded splits and what batching them needs."""
    train: list[tuple[list[int], list[int]]]
    val: list[tuple[list[int], list[int]]]
    pad: int
    lengths: list[int] | None  # the train rows' lengths, when training.length_bucketing


def read_rows(tok, data_dir: Path, params: Params) -> Rows:
    """data_dir's train and val splits encoded (prompt masked); a completion too long for the model is a DataError."""
    msl = params.model.max_seq_len
    try:
        train_rows = [encode(tok, r, msl) for r in read_jsonl(Path(data_dir) / "train.jsonl")]
        val_rows = [encode(tok, r, msl) for r in read_jsonl(Path(data_dir) / "val.jsonl")]
    except ValueError as e:  # a completion longer than model.max_seq_len: bad data or params (exit 2), not a crash
        raise DataError(f"{data_dir}: {e}") from None
    lengths = [len(x) for x, _ in train_rows] if params.training.length_bucketing else None
    return Rows(train_rows, val_rows, tok.pad_token_id, lengths)


def build_optimizer(run: Run, model, total: int):
    """Wrap the model for the launch, then its optimizer, LR schedule and loss scaler: (model, opt, sched, scaler)."""
    tp = run.params.training
    model, opt = run.dist.prepare(model, lambda m: make_optimizer(m, run.params, run.dev)[0])
    from transformers import get_scheduler  # heavy: loaded by launch() already, not at this module's import
    sched = get_scheduler(tp.lr_scheduler, opt, num_warmup_steps=tp.warmup_steps, num_training_steps=total)
    scaler = run.dist.grad_scaler(run.dev, enabled=run.fp16)  # disabled (bf16/fp32): every call is a pass-through
    return model, opt, sched, scaler


def open_history(out_dir: Path, start: int) -> IO[str]:
    """out_dir/history.jsonl cut back to step `start`, opened for appending (main rank)."""
    hist_path = out_dir / "history.jsonl"
    history = read_jsonl(hist_path) if hist_path.is_file() else []
    history = [h for h in history if h["step"] <= start]  # drop what the crashed run logged after its checkpoint
    out_dir.mkdir(parents=True, exist_ok=True)
    hist_path.write_text("".join(json.dumps(h) + "\n" for h in history))
    return hist_path.open("a")


def train_step(run: Run, model, opt, sched, scaler, rows: Rows, step: int, mem: dict) -> dict:
    """One optimizer step over training.grad_accum micro-batches; returns its history record."""
    tp, dist = run.params.training, run.dist
    ts = time.time()
    batches = [make_batch([rows.train[i] for i in dist.shard(batch_order(len(rows.train), (step - 1) * tp.grad_accum + a,
                                                                        tp.batch_size, run.params.seed, rows.lengths))],
                          rows.pad, run.params)
               for a in range(tp.grad_accum)]
    tot_loss, tokens = forward_backward(run, model, batches, scaler, rows.pad, step)
    gn, lr, scale, skipped = optimizer_step(run, model, opt, sched, scaler, step)
    dt = time.time() - ts
    rec = {"step": step, "train_loss": dist.sum(tot_loss) / dist.world, "lr": lr, "grad_norm": float(gn),
           "tokens_per_s": dist.sum(tokens) / dt, "peak_mem_bytes": peak_memory(run.dev, mem), "time": time.time()}
    if scaler.is_enabled():
        rec.update(grad_scale=scale, skipped=skipped)
        if skipped:
            run.say(f"step {step}: fp16 gradients overflowed at loss scale {scale:g}; step skipped, scale now {scaler.get_scale():g}")
    return rec


def forward_backward(run: Run, model, batches: list[dict], scaler, pad: int, step: int) -> tuple[float, int]:
    """Forward and backward of the step's micro-batches: (this rank's share of the step's loss, its tokens)."""
    tp, dist = run.params.training, run.dist
    # The step's loss is the mean over every completion token of the step (all micro-batches, all
    # ranks), so any world size and any grad_accum give the single-process update: each micro-batch's
    # summed loss is divided by that count over the world size, because DDP and FSDP average the
    # ranks' gradients. One process with grad_accum 1: loss_sum / n, the arithmetic it always was.
    denom = max(dist.sum(sum(completion_tokens(b) for b in batches)), 1) / dist.world
    tot_loss, tokens = 0.0, 0
    for a, batch in enumerate(batches):
        with dist.no_sync(model, last=a == tp.grad_accum - 1):  # DDP: one all-reduce per optimizer step
            loss_sum, _ = token_loss(model, batch, run.dev)
            loss = loss_sum / denom
            if dist.any(not torch.isfinite(loss).item()):
                raise DivergenceError(f"[{run.kind}] loss is {dist.mean(loss.item())} at step {step}: training diverged "
                                      f"(training.lr={tp.lr} is likely too high); nothing downstream was run")
            dist.backward(scaler.scale(loss))
        tot_loss += loss.item()
        tokens += int((batch["input_ids"] != pad).sum()) if batch["attention_mask"] is None else int(batch["attention_mask"].sum())
    return tot_loss, tokens


def optimizer_step(run: Run, model, opt, sched, scaler, step: int) -> tuple[torch.Tensor, float, float, bool]:
    """Clip, then step the optimizer and the schedule unless fp16 overflowed: (grad norm, lr, loss scale, skipped)."""
    tp, dist = run.params.training, run.dist
    scaler.unscale_(opt)  # fp16: the norm and the clipping are of the true gradients
    gn = dist.clip(model, tp.max_grad_norm)
    if dist.any(not torch.isfinite(gn).item()) and not scaler.is_enabled():
        raise DivergenceError(f"[{run.kind}] gradient norm is {float(gn)} at step {step}: training diverged "
                              f"(lower training.lr={tp.lr}); nothing downstream was run")
    lr = sched.get_last_lr()[0]
    scale = scaler.get_scale()
    scaler.step(opt)  # fp16: skipped when a gradient overflowed; otherwise opt.step()
    scaler.update()
    skipped = scaler.get_scale() < scale  # the scaler lowers its scale exactly when it skipped the step
    if skipped and scaler.get_scale() < 1.0:
        raise DivergenceError(f"[{run.kind}] gradients are non-finite even at a loss scale below 1 at step {step}: "
                              f"training diverged (lower training.lr={tp.lr}); nothing downstream was run")
    if not skipped:
        sched.step()
    opt.zero_grad(set_to_none=True)
    return gn, lr, scale, skipped


def record_step(rec: dict, hist: IO[str] | None, bar) -> None:
    """Append the step's record to history.jsonl (main rank) and move the progress bar."""
    if hist:
        hist.write(json.dumps(rec) + "\n")
        hist.flush()
    if bar is not None:
        bar.update(1, loss=rec["train_loss"], **{"tok/s": rec["tokens_per_s"]})


def finish(run: Run, model, out_dir: Path, hist: IO[str] | None, total: int, resumed_from: int | None,
           vl: float | None, facts: dict) -> dict:
    """Save the final adapter and write result.json last (its presence means finished); returns its dict on every rank."""
    dist, dev, kind = run.dist, run.dev, run.kind
    full = dist.full_state_dict(model)  # collective under FSDP
    final = out_dir / "adapter"
    hist_path = out_dir / "history.jsonl"
    result: dict = {}
    if dist.main:
        hist.close()
        with dist.plain_tree(model) as unwrapped:
            check_finite(adapter_state(unwrapped, full), f"[{kind}] final adapter")
            with atomic_dir(final) as tmp:
                unwrapped.save_pretrained(tmp, state_dict=full)
        hrows = read_jsonl(hist_path)
        result = {
            "kind": kind, "adapter_dir": str(final), "steps": total, "resumed_from": resumed_from,
            "final_train_loss": hrows[-1]["train_loss"], "final_val_loss": vl if vl is not None else hrows[-1].get("val_loss"),
            **facts,  # trainable_params, total_params, trainable_share, weight_bytes, optimizer
            "device": dev.type, "processes": dist.world, "compute_dtype": str(compute_dtype(run.params.quantization, dev)),
            "peak_mem_bytes": max(h["peak_mem_bytes"] for h in hrows),
            # this process's high-water mark: the training's own peak when it runs in a fresh process
            "after_import_rss_bytes": run.after_import_rss, "allocator": allocator(),
            "process_peak_bytes": process_peak_bytes() if dev.type == "cpu" else int(torch.cuda.max_memory_allocated()),
            "mean_tokens_per_s": sum(h["tokens_per_s"] for h in hrows) / len(hrows),
            "train_seconds": time.time() - run.t0, "history": str(hist_path),
        }
        atomic_write_json(out_dir / "result.json", result)  # written last: its presence means "finished"
    dist.barrier()
    return result if dist.main else read_json(out_dir / "result.json")


# ---------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", required=True)
    ap.add_argument("--kind", choices=["qlora", "lora"], required=True)
    ap.add_argument("--base-dir", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    die_with_parent_if_tied()  # started by `qlora-ops run`: never outlive it
    console.configure()  # as quiet (or verbose) as the parent that started this process
    if int(os.environ.get("RANK", "0")) != 0:
        logging.disable(logging.INFO)
    try:
        res = train(load_params(a.params), Path(a.base_dir), Path(a.data_dir), Path(a.out), a.kind, on_log=print)
    except (DivergenceError, DataError, ParamsError) as e:
        # exit code and error.json keep the class for a parent (tasks.train.process): 3 diverged, 2 bad input
        code = 3 if isinstance(e, DivergenceError) else 2
        print(f"error: {e}", file=sys.stderr)
        # One error.json, rank 0's: these errors are raised on every rank together (the launch check and the
        # data are the same on all, a divergence is agreed by Dist.any), and one writer never races another.
        if int(os.environ.get("RANK", "0")) == 0:
            atomic_write_json(Path(a.out) / "error.json", {"error": type(e).__name__, "message": str(e)})
        return code
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in res.items() if k != "history"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
