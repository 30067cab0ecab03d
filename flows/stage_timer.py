"""Wall seconds and peak memory of each stage, printed as it starts and ends."""
from __future__ import annotations

import time

from qlora_ops.tasks.core.memory import PeakMemory


class StageTimer:
    """`timer("train_qlora", fn, *a)` runs fn and records its wall seconds in `timer.seconds` and its
    peak memory in `timer.peak_mb` (MiB, measured from the stage's own start: tasks.core.memory)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}

    def __call__(self, name: str, fn, *a, **k):
        # One line at the start and one at the end of each stage (printed: inside a flow, log_prints
        # sends it to the run's log as well as the console).
        print(f"{time.strftime('%H:%M:%S')} {name} ...", flush=True)
        t = time.time()
        ok = False
        pm = PeakMemory()
        try:
            with pm:
                out = fn(*a, **k)
            ok = True
            return out
        finally:
            self.seconds[name] = round(time.time() - t, 1)
            self.peak_mb[name] = pm.peak_mb
            print(f"{time.strftime('%H:%M:%S')} {name} {'done in' if ok else 'failed after'} {self.seconds[name]:.1f} s",
                  flush=True)
