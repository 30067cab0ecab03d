"""One process or many: the training loop talks to this, never to torch.distributed directly.

Single process (the default, CPU or one GPU): every method is a cheap pass-through, so the loop's
numerics are exactly the plain loop's. Under `accelerate launch` / `torchrun` (WORLD_SIZE > 1) it is
accelerate's Accelerator: DDP, or FSDP when launched with infra/accelerate/fsdp_qlora.yaml. Each rank
takes a strided slice of every micro-batch, so the global batch (and the data order) is the same
whatever the number of processes.
"""
from __future__ import annotations

import os

import torch


class Dist:
    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.acc = None
        if self.world > 1:
            from accelerate import Accelerator
            self.acc = Accelerator(cpu=not torch.cuda.is_available())
        self.rank = self.acc.process_index if self.acc else 0
        self.main = self.rank == 0
        self.fsdp = bool(self.acc) and self.acc.distributed_type.name == "FSDP"

    def device(self, default: torch.device) -> torch.device:
        return self.acc.device if self.acc else default

    def prepare(self, model, opt):
        return self.acc.prepare(model, opt) if self.acc else (model, opt)

    def shard(self, idx: list[int]) -> list[int]:
        return idx[self.rank::self.world]

    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss) if self.acc else loss.backward()

    def clip(self, model, max_norm: float) -> torch.Tensor:
        params = [p for p in model.parameters() if p.requires_grad]
        if self.acc:
            return self.acc.clip_grad_norm_(params, max_norm)
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def mean(self, x: float) -> float:
        if not self.acc:
            return x
        return float(self.acc.reduce(torch.tensor(float(x), device=self.acc.device), "mean"))

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on one: a NaN on one rank must stop them all together."""
        if not self.acc:
            return flag
        return float(self.acc.reduce(torch.tensor(float(flag), device=self.acc.device), "sum")) > 0

    def barrier(self) -> None:
        if self.acc:
            self.acc.wait_for_everyone()

    def unwrap(self, model):
        return self.acc.unwrap_model(model) if self.acc else model

    def full_state_dict(self, model):
        """Collective under FSDP (every rank must call); None = let the model produce its own."""
        return self.acc.get_state_dict(model) if self.acc else None


def prepare_for_fsdp(model, dtype: torch.dtype) -> set[torch.dtype]:
    """FSDP flattens each wrapped module's parameters into one tensor, so they must share a dtype.
    With bnb_4bit_quant_storage=dtype the packed 4-bit weights are stored as `dtype`; cast every
    other floating parameter (norms, embeddings, LoRA) to match. Returns the dtypes left (one)."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return {p.dtype for p in model.parameters()}
