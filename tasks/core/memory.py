"""Peak memory of one stage, and giving freed memory back to the OS.

    with PeakMemory() as pm:
        run_stage()
    pm.peak_mb   # CUDA: max allocated since the start; CPU: the highest RSS a sampler thread saw

On CPU a process's own high-water mark (ru_maxrss) never goes down, so a stage that runs after a
bigger one would report the bigger one's peak: a sampler thread (psutil, every 10 ms) measures each
stage from its own start instead. A stage run in a fresh process (training) reports that process's
ru_maxrss, which is exact (`process_peak_bytes`); a stage run through tasks.core.child notes its
child's ru_maxrss here (`note_child_peak`), and the stage's peak is the larger of the two processes'
peaks (what `/usr/bin/time -v` reports for a process tree: the largest process, not the sum).
"""
from __future__ import annotations

import ctypes
import gc
import resource
import sys
import threading

INTERVAL_S = 0.01
_child_peaks: list[int] = []  # ru_maxrss of every stage child this process ran, in order (note_child_peak)


def note_child_peak(nbytes: int) -> None:
    """A child process that ran (part of) a stage ended with this peak RSS: PeakMemory windows open
    meanwhile count it."""
    _child_peaks.append(int(nbytes))


def _cuda():
    torch = sys.modules.get("torch")  # only if something already imported it: no import-time cost here
    return torch if torch is not None and torch.cuda.is_available() else None


def process_peak_bytes() -> int:
    """This process's peak RSS since it started (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_memory() -> None:
    """Collect, then hand glibc's free heap pages back to the OS: after a model load (an fp32 read
    quantized to 4 bits) the arenas otherwise keep the freed hundreds of MB in the RSS for good.
    On CUDA, also return the caching allocator's free blocks to the driver: cached, they stay
    reserved by this process, and a training in another process could not use them."""
    gc.collect()
    if (torch := _cuda()) is not None:
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        pass


class PeakMemory:
    def __init__(self) -> None:
        self.peak_bytes = 0
        self.child_peak_bytes = 0  # the largest child's own peak (CPU), included in peak_bytes
        self._children_from = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        self._children_from = len(_child_peaks)
        if (torch := _cuda()) is not None:
            torch.cuda.reset_peak_memory_stats()
            return self
        import psutil

        proc = psutil.Process()
        self.peak_bytes = proc.memory_info().rss

        def sample() -> None:
            while not self._stop.wait(INTERVAL_S):
                self.peak_bytes = max(self.peak_bytes, proc.memory_info().rss)

        self._thread = threading.Thread(target=sample, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            torch = _cuda()
            self.peak_bytes = int(torch.cuda.max_memory_allocated()) if torch is not None else 0
            return
        self._stop.set()
        self._thread.join()
        import psutil

        self.peak_bytes = max(self.peak_bytes, psutil.Process().memory_info().rss)
        self.child_peak_bytes = max(_child_peaks[self._children_from:], default=0)
        self.peak_bytes = max(self.peak_bytes, self.child_peak_bytes)

    @property
    def peak_mb(self) -> float:
        return round(self.peak_bytes / 2**20, 1)
