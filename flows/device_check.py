"""A model stage meant for a GPU refuses to train without one: a CPU fallback takes hours, trains in other
numerics than the GPU it was meant for, and holds the GPU pool's slot all that time."""
from __future__ import annotations

import os
import socket

from qlora_ops.tasks.core.config import Params, ParamsError


class NoCudaDevice(ParamsError):
    """The model stage runs where orchestration says a GPU is required, and torch sees none."""


def gpu_required(params: Params) -> bool:
    o = params.orchestration
    return o.gpu_required if o.gpu_required is not None else bool(o.gpu_pool)


def require_cuda(params: Params) -> None:
    """Before any work of the model stage: NoCudaDevice, naming the pool and the image, when a GPU is
    required (orchestration.gpu_required; by default exactly when gpu_pool is set) and torch has none."""
    if not gpu_required(params):
        return
    import torch

    if torch.cuda.is_available():
        return
    pool, image = where()
    build = f"torch {torch.__version__} built {'with CUDA ' + torch.version.cuda if torch.version.cuda else 'without CUDA'}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    raise NoCudaDevice(
        f"the model stage on work pool {pool or params.orchestration.gpu_pool!r} (image {image}, host "
        f"{socket.gethostname()}) found no CUDA device ({build}"
        f"{', CUDA_VISIBLE_DEVICES=' + repr(visible) if visible is not None else ''}); it refuses to train on CPU. "
        "Run this pool's workers where a GPU is visible (a GPU node, the NVIDIA container runtime, a CUDA build of "
        "torch), or set orchestration.gpu_required: false in the params if CPU is intended")


def where() -> tuple[str | None, str]:
    """(work pool, image) of the current flow run as Prefect knows them: the run's job variables, its
    deployment's, its pool's default; else $QLORA_OPS_IMAGE; else a process worker (no image). Best
    effort: only an error message reads it."""
    pool, image = None, None
    try:
        from prefect.context import FlowRunContext

        fr = ctx.flow_run if (ctx := FlowRunContext.get()) else None
        if fr is not None:
            pool, image = fr.work_pool_name, (fr.job_variables or {}).get("image")
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as c:
                if not image and fr.deployment_id:
                    image = (c.read_deployment(fr.deployment_id).job_variables or {}).get("image")
                if not image and pool:
                    props = c.read_work_pool(pool).base_job_template.get("variables", {}).get("properties", {})
                    image = props.get("image", {}).get("default")
    except Exception:  # an unreachable API must not hide the real message
        pass
    return pool, image or os.environ.get("QLORA_OPS_IMAGE") or "none: a process worker, not a container"
