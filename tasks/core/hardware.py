"""Where the numbers are computed: the device, the compute dtype it gets, the number of training processes,
and what the keys record of it."""
from __future__ import annotations

import platform
from typing import TYPE_CHECKING

from qlora_ops.tasks.core.config import ParamsError

if TYPE_CHECKING:  # torch is imported where it is used: the keys and the CLI import this module without a model
    import torch

    from qlora_ops.tasks.core.config import Params, QuantParams


def device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(q: QuantParams, dev: torch.device, capability: tuple[int, int] | None = None) -> torch.dtype:
    """`auto`: bf16 on GPUs with native bf16 (compute capability >= 8.0: A100, L4, H100, RTX 30xx+), fp16
    on older ones (T4, V100: torch.cuda.is_bf16_supported() also counts emulated bf16 there, which
    runs several times slower), float32 on CPU. `capability` stands in for the device's (tests)."""
    import torch

    if q.compute_dtype != "auto":
        return getattr(torch, q.compute_dtype)
    if dev.type == "cuda":
        major, _ = capability or torch.cuda.get_device_capability(dev)
        return torch.bfloat16 if major >= 8 else torch.float16
    return torch.float32  # bf16 matmuls on CPU measured 13-25x slower than fp32


def hardware() -> dict[str, str]:
    """What the numbers are computed on: the device type, and the GPU model and compute capability (CUDA),
    or the CPU architecture and the kernel level torch dispatches to (AVX2/AVX512 sum in other orders)."""
    import torch

    dev = device()
    if dev.type == "cuda":
        i = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(i)
        return {"device": "cuda", "gpu": torch.cuda.get_device_name(i), "capability": f"{major}.{minor}",
                "cuda": str(torch.version.cuda)}
    return {"device": dev.type, "arch": platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def resolve_processes(params: Params) -> int:
    """How many training processes training.processes asks for on this machine: auto = the visible CUDA
    GPUs (CUDA_VISIBLE_DEVICES counts), 1 without CUDA. On CPU any number runs (gloo: the multi-process
    tests); on CUDA no more than the GPUs, since two ranks on one GPU share its memory and NCCL refuses them."""
    import torch

    n = params.training.processes
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == "auto":
        return max(gpus, 1)
    if gpus and n > gpus:
        raise ParamsError(f"training.processes={n} but this machine sees {gpus} GPU(s): one process per GPU; set "
                          f"training.processes: auto (or at most {gpus}), or give the worker {n} GPUs "
                          "(infra: the GPU pool's `gpus` job variable, GPU_COUNT for docker compose)")
    return n
