"""Checkpoints of a training run: written crash-safe, found and loaded on resume, the oldest pruned.

out_dir/checkpoints/step-N holds the adapter (main rank), each rank's optimizer, scheduler, loss
scaler and RNG state, checkpoint.json and a manifest. It is written to a temp dir and renamed, so a
directory named step-N is always complete; a re-run resumes from the newest one that verifies.
peft and safetensors are imported where used: they are heavy, and the loop has them loaded by then.
"""
from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import torch

from qlora_ops.tasks.core.util import atomic_write_json, read_json, verify_manifest, write_manifest
from qlora_ops.tasks.model.modeling import check_finite
from qlora_ops.tasks.train.distributed import Dist

STEP_RE = re.compile(r"^step-(\d+)$")


def adapter_state(model, full: dict | None = None) -> dict[str, torch.Tensor]:
    """The LoRA weights of `model` (or of its full state dict `full`), on the CPU; never empty."""
    from peft import get_peft_model_state_dict
    sd = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model, state_dict=full).items()}
    if not sd:  # an adapter file without weights would load as "no change" everywhere downstream
        raise RuntimeError("the adapter state dict is empty: no LoRA weight was found in the model's state dict")
    return sd


def _rank_file(rank: int) -> str:
    return "trainer_state.pt" if rank == 0 else f"trainer_state.rank{rank}.pt"


def save_checkpoint(ckpt_root: Path, step: int, model, opt, sched, extra: dict, keep_last: int, dist: Dist,
                    scaler=None) -> Path:
    """Adapter (main rank) + each rank's optimizer/scheduler/RNG state, into a temp dir renamed at the end;
    then only the newest `keep_last` checkpoints are kept."""
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
            sd = adapter_state(unwrapped, full)
            check_finite(sd, f"checkpoint at step {step}")  # safetensors happily stores NaN: refuse here
            unwrapped.save_pretrained(tmp, state_dict=full)  # adapter_model.safetensors + adapter_config.json
        atomic_write_json(tmp / "checkpoint.json", {"step": step, "world_size": dist.world, "fsdp": bool(dist.fsdp),
                                                    **extra})
        write_manifest(tmp)  # sha256 + size of every file: a later truncation is caught before resuming
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # atomic: a step-N dir is complete or absent
        for old in prunable(checkpoints(ckpt_root), step, keep_last):
            shutil.rmtree(ckpt_root / f"step-{old:06d}", ignore_errors=True)
    dist.barrier()
    return final


def prunable(steps: list[int], step: int, keep_last: int) -> list[int]:
    """The checkpoints to delete after writing `step`: every one past it (a line this run did not resume
    from: it will never be resumed again, and keeping it by step number would prune what we just wrote),
    then all but the newest `keep_last` up to `step` (which is always kept)."""
    ours = sorted(s for s in steps if s <= step)
    return sorted(s for s in steps if s > step) + ours[:-keep_last]


class ResumeRefused(RuntimeError):
    """A checkpoint that cannot be resumed by this launch, and why (a fresh start would silently discard it)."""


def resumable(meta: dict, dist: Dist) -> str:
    """Which trainer-state file this rank resumes from, or ResumeRefused. The same process count: its own.
    Another count without FSDP on either side (one process or DDP): the optimizer state is replicated, every
    rank held the same, so rank 0's is every rank's (the data is re-sharded; the global batch and its update
    are the same for any count). FSDP on either side with more than one process: each rank's file holds
    only its shard of the optimizer state, which another count cannot re-assemble."""
    world, fsdp = int(meta.get("world_size", 1)), bool(meta.get("fsdp", False))
    if world == dist.world and fsdp == bool(dist.fsdp):
        return _rank_file(dist.rank)
    sharded = [f"written by FSDP over {world} processes" if fsdp and world > 1 else "",
               f"this launch is FSDP over {dist.world}" if dist.fsdp and dist.world > 1 else ""]
    if any(sharded):
        raise ResumeRefused(f"checkpoint step {meta.get('step')} cannot be resumed by this launch: "
                            f"{'; '.join(x for x in sharded if x)} (checkpoint: {world} process(es), fsdp={fsdp}; "
                            f"this launch: {dist.world}, fsdp={bool(dist.fsdp)}): FSDP optimizer state is sharded per rank and cannot be loaded "
                            f"by another layout. Relaunch with {world} process(es) {'under' if fsdp else 'without'} "
                            "FSDP to resume, or delete the run's checkpoints/ dir to train from step 0")
    return _rank_file(0)


def checkpoints(ckpt_root: Path) -> list[int]:
    """Steps of the complete checkpoints under ckpt_root, oldest first."""
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
            rank_file = resumable(meta, dist)  # ResumeRefused is not "damaged": it stops the run, below
            sd = load_file(path / "adapter_model.safetensors")
            check_finite(sd, str(path))
            # weights_only=True: tensors and plain containers only, no arbitrary unpickling.
            state = torch.load(path / rank_file, weights_only=True)
            set_peft_model_state_dict(model, sd)
            moved = f", written by {meta.get('world_size', 1)} process(es)" if meta.get("world_size", 1) != dist.world else ""
            say(f"resuming from checkpoint step {step} ({path}{moved})")
            return step, state
        except ResumeRefused:
            raise
        except Exception as e:  # a damaged checkpoint: say so and try the one before
            say(f"checkpoint step {step} unusable ({e}); trying an older one")
    return 0, None


def apply_trainer_state(state: dict, opt, sched, scaler=None) -> None:
    """Put a checkpoint's optimizer, scheduler, loss scaler and RNG state back."""
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
