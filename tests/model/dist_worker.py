"""Launched by tests/model/test_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU).

    torchrun --nproc_per_node 2 tests/model/dist_worker.py BASE DATA OUT_ROOT NAME=PARAMS.yaml [NAME=PARAMS.yaml ...]

Trains each params file with tasks.train.loop.train (what `-m qlora_ops.tasks.train` runs) into OUT_ROOT/NAME, one
after the other in the same process group, and counts DDP's gradient all-reduces with a comm hook
(torch's own allreduce hook, wrapped): OUT_ROOT/NAME/allreduces-rank<r>.json.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from qlora_ops.tasks.train import distributed
    from qlora_ops.tasks.core.config import load_params
    from qlora_ops.tasks.train.loop import train

    base, data, root = Path(argv[0]), Path(argv[1]), Path(argv[2])
    calls: list[int] = []
    prepare = distributed.Dist.prepare

    def counting(self, model, make_optimizer):
        model, opt = prepare(self, model, make_optimizer)

        def hook(state, bucket):
            calls.append(1)
            return default_hooks.allreduce_hook(state, bucket)

        model.register_comm_hook(None, hook)  # None: the default process group
        return model, opt

    distributed.Dist.prepare = counting
    for spec in argv[3:]:
        name, pfile = spec.split("=", 1)
        before = len(calls)
        train(load_params(pfile), base, data, root / name, "qlora", on_log=lambda s: None)
        (root / name / f"allreduces-rank{os.environ['RANK']}.json").write_text(json.dumps(len(calls) - before))


if __name__ == "__main__":
    main(sys.argv[1:])
