"""One process or many: the training loop talks to this, never to torch.distributed directly.

Single process (the default, CPU or one GPU): every method is a cheap pass-through, so the loop's
numerics are exactly the plain loop's. Under `accelerate launch` / `torchrun` (WORLD_SIZE > 1):
- DDP: accelerate's Accelerator (`prepare`, `no_sync`, `clip_grad_norm_`).
- FSDP (`accelerate launch` with infra/accelerate/fsdp_qlora.yaml, which sets ACCELERATE_USE_FSDP):
  torch's FSDP1, configured from the FSDP_* settings accelerate exported (its FullyShardedDataParallelPlugin)
  and wrapped with peft's FSDP auto-wrap policy (LoRA layers in their own units), as upstream
  FSDP-QLoRA does. We wrap it ourselves rather than through `Accelerator.prepare` because accelerate
  only runs FSDP on an accelerator device: this way the one FSDP path is also the one the CPU (gloo)
  tests run (tests/model/test_distributed.py).
Each rank takes a strided slice of every micro-batch, so the global batch (and the data order) is the
same whatever the number of processes; the loop normalises the loss by the global number of
completion tokens (`sum`), so any world size gives the single-process update.
"""
from __future__ import annotations

import contextlib
import os

import torch

from qlora_ops.tasks.core.config import ParamsError


def fsdp_requested(env: dict | None = None) -> bool:
    """FSDP decided the way accelerate decides it (accelerate.state): `accelerate launch` with an FSDP
    config exports ACCELERATE_USE_FSDP=true. Known from the environment alone, before any model exists."""
    env = os.environ if env is None else env
    return int(env.get("WORLD_SIZE", "1")) > 1 and env.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_launch(params, kind: str, env: dict | None = None) -> None:
    """What the launch makes impossible, refused before any model is loaded (tasks.core.config.ParamsError:
    exit 2, naming the key and the fix)."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    bs = params.training.batch_size
    if bs < world:
        raise ParamsError(f"training.batch_size={bs} is smaller than the number of processes ({world}): each process "
                          f"takes a slice of every micro-batch and would get none. training.batch_size is the global "
                          f"batch: set it to at least {world}, or launch at most {bs} processes")
    storage = params.quantization.quant_storage
    if kind == "qlora" and fsdp_requested(env) and not getattr(torch, storage).is_floating_point:
        raise ParamsError(f"quantization.quant_storage={storage} cannot be trained with FSDP: FSDP flattens each unit's "
                          "parameters into one tensor of one dtype, and casting the model's floating-point weights "
                          f"(embeddings, norms) to {storage} would destroy them. Set quantization.quant_storage to the "
                          "compute dtype (bfloat16 on GPUs with bf16, float16 otherwise, float32 on CPU) for FSDP "
                          "runs (docs/multi-gpu.md), or launch with infra/accelerate/ddp.yaml")


class Dist:
    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.fsdp = fsdp_requested()
        self.acc = None
        if self.world > 1:
            from accelerate import Accelerator
            self.acc = Accelerator(cpu=not torch.cuda.is_available())
        self.rank = self.acc.process_index if self.acc else 0
        self.main = self.rank == 0

    def device(self, default: torch.device) -> torch.device:
        return self.acc.device if self.acc else default

    def prepare(self, model, make_optimizer):
        """Wrap the model for the launch (nothing, DDP or FSDP) and build its optimizer with
        `make_optimizer(model)` over what the optimizer must step: under FSDP the wrapped model's
        (sharded) parameters, so the optimizer is built after wrapping."""
        if not self.acc:
            return model, make_optimizer(model)
        if self.fsdp:
            model = self._wrap_fsdp(model)
            return model, make_optimizer(model)
        return self.acc.prepare(model, make_optimizer(model))

    def shard(self, idx: list[int]) -> list[int]:
        return idx[self.rank::self.world]

    def _wrap_fsdp(self, model):
        from accelerate.utils import FullyShardedDataParallelPlugin
        from peft.utils.other import fsdp_auto_wrap_policy
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables `accelerate launch` exported
        if plugin.fsdp_version != 1:
            raise ValueError(f"fsdp_version {plugin.fsdp_version}: this loop runs FSDP1 (bitsandbytes 4-bit weights "
                             "cannot be DTensor shards); set fsdp_version: 1 as in infra/accelerate/fsdp_qlora.yaml")
        # peft's policy: every LoRA layer (trainable) in its own unit, transformer layers (frozen) in theirs;
        # a unit then holds trainable or frozen parameters only, of one dtype (prepare_for_fsdp).
        return FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), sharding_strategy=plugin.sharding_strategy,
                    backward_prefetch=plugin.backward_prefetch, forward_prefetch=plugin.forward_prefetch,
                    use_orig_params=plugin.use_orig_params, limit_all_gathers=plugin.limit_all_gathers,
                    cpu_offload=plugin.cpu_offload, sync_module_states=bool(plugin.sync_module_states),
                    # explicit: FSDP refuses to guess "cpu", and accelerate's "cpu:0" is not the params' "cpu"
                    device_id=torch.device("cpu") if self.acc.device.type == "cpu" else self.acc.device)

    def no_sync(self, model, last: bool):
        """Around the forward and backward of one micro-batch. DDP: gradients stay local on every
        micro-batch but the step's last (accelerate's no_sync), so one all-reduce per optimizer step.
        FSDP reduce-scatters every micro-batch: its no_sync would keep whole unsharded gradients on
        every GPU, which is what FSDP is there to avoid (accelerate's sync_each_batch trade)."""
        if last or not self.acc or self.fsdp:
            return contextlib.nullcontext()
        return self.acc.no_sync(model)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()  # what Accelerator.backward does with no accumulation steps and no scaler of its own

    def grad_scaler(self, dev: torch.device, enabled: bool):
        """fp16 training needs loss scaling (gradients under ~6e-8 flush to zero in fp16). Disabled, every
        call is a pass-through (the bf16/fp32 default path is untouched). Under FSDP each rank sees only
        its shard's gradients: the sharded scaler agrees on an overflow across ranks."""
        if enabled and self.fsdp:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
            return ShardedGradScaler(dev.type)
        return torch.amp.GradScaler(dev.type, enabled=enabled)

    def clip(self, model, max_norm: float) -> torch.Tensor:
        """Clip by the norm of the whole gradient and return that norm (the same on every rank).
        FSDP: the wrapped model's own clip_grad_norm_, which all-reduces the shards' norms (what
        accelerate's FSDP branch calls); clipping the local parameters would clip each shard by its
        own norm. DDP: gradients are already all-reduced, identical on every rank."""
        if self.fsdp:
            return model.clip_grad_norm_(max_norm)
        if self.acc:
            return self.acc.clip_grad_norm_(model.parameters(), max_norm)
        return torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)

    def sum(self, x: float) -> float:
        """Sum over ranks (float64: token counts stay exact)."""
        if not self.acc:
            return x
        return float(self.acc.reduce(torch.tensor(float(x), dtype=torch.float64, device=self.acc.device), "sum"))

    def mean(self, x: float) -> float:
        return self.sum(x) / self.world if self.acc else x

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on one: a NaN on one rank must stop them all together."""
        if not self.acc:
            return flag
        return self.sum(float(flag)) > 0

    def barrier(self) -> None:
        if self.acc:
            self.acc.wait_for_everyone()

    def unwrap(self, model):
        return self.acc.unwrap_model(model) if self.acc else model

    @contextlib.contextmanager
    def plain_tree(self, model):
        """The unwrapped model for saving: under FSDP every nested unit is replaced by the module it
        wraps for the duration of the block. peft finds adapter weights by module path and strips only
        a leading FSDP prefix (peft 0.21): inside nested units ("layers.0._fsdp_wrapped_module.self_attn")
        it found none and saved an empty adapter. Parameters are not touched; the units go back on exit."""
        model = self.unwrap(model)
        swapped = []
        if self.fsdp:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            for parent in list(model.modules()):
                for name, child in list(parent.named_children()):
                    if isinstance(child, FSDP):
                        swapped.append((parent, name, child))
                        setattr(parent, name, child.module)
        try:
            yield model
        finally:
            for parent, name, child in reversed(swapped):
                setattr(parent, name, child)

    def full_state_dict(self, model):
        """Collective under FSDP (every rank must call); None = let the model produce its own.
        FSDP: gathered unit by unit into rank 0's CPU memory (other ranks get {})."""
        if self.fsdp:
            from torch.distributed.fsdp import FullStateDictConfig, StateDictType
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            gpu = next(model.parameters()).device.type != "cpu"  # offloading from the CPU to itself breaks FSDP1
            with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT,
                                      FullStateDictConfig(offload_to_cpu=gpu, rank0_only=True)):
                return model.state_dict()
        return self.acc.get_state_dict(model) if self.acc else None

    def layout(self, model) -> dict:
        """What this rank really runs and holds: the wrapper, and under FSDP its units and the share
        of the parameters stored here (written per rank next to the run, checked by the tests)."""
        out = {"rank": self.rank, "world": self.world, "wrapper": type(model).__name__, "fsdp": self.fsdp}
        if self.fsdp:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            # FSDP1's flat parameters (private attributes: recorded only where this torch has them)
            flat = [h.flat_param for m in FSDP.fsdp_modules(model) if (h := getattr(m, "_handle", None)) is not None]
            out.update(fsdp_units=len(flat), local_numel=sum(f.numel() for f in flat))
            if all(hasattr(f, "_unpadded_unsharded_size") for f in flat):
                out["full_numel"] = sum(f._unpadded_unsharded_size.numel() for f in flat)
        return out


def prepare_for_fsdp(model, dtype: torch.dtype) -> set[torch.dtype]:
    """FSDP flattens each unit's parameters into one tensor, so they must share a dtype. With
    bnb_4bit_quant_storage=dtype the packed 4-bit weights are stored as `dtype`; cast every other
    frozen floating parameter (norms, embeddings, which prepare_model_for_kbit_training made fp32)
    to match. Trainable (LoRA) parameters keep their dtype: peft's wrap policy gives them units of
    their own, and their fp32 master weights keep small updates. Returns the frozen dtypes (one)."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return {p.dtype for p in model.parameters() if not p.requires_grad}
