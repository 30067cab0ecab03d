"""Per-stage peak memory: each stage is measured from its own start (not the process's high-water
mark), so a small stage after a big one reports its own, small peak."""
import time

from qlora_ops.flows.runtime import StageTimer


def hold(mb: int) -> int:
    buf = bytearray(mb * 2**20)  # zero-filled: resident, not just reserved
    for i in range(0, len(buf), 4096):
        buf[i] = 1
    time.sleep(0.1)  # the sampler (10 ms) sees it
    return len(buf)


def test_each_stage_has_its_own_peak():
    timed = StageTimer()
    timed("big", hold, 300)
    timed("small", hold, 10)
    assert timed.peak_mb["big"] - timed.peak_mb["small"] > 200, timed.peak_mb
    assert set(timed.peak_mb) == set(timed.seconds) == {"big", "small"}
