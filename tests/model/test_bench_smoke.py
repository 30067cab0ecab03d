"""The benchmark script runs end to end (tiny model, 2 steps): no timing asserted, only that it
measures both kinds and prints the comparison, so it does not rot between GPU sessions."""
import json
import subprocess
import sys

from tests.conftest import ROOT


def test_throughput_bench_runs_and_compares_both_kinds():
    r = subprocess.run([sys.executable, "bench/train_throughput.py", "--tiny", "--steps", "2", "--batch-size", "4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "QLoRA/LoRA" in r.stdout and "tokens/s (steady)" in r.stdout
    out = json.loads((ROOT / "bench" / "out" / "throughput.json").read_text())
    assert out["qlora"]["weight_bytes"] < out["lora"]["weight_bytes"]
    assert out["qlora"]["steps"] == out["lora"]["steps"] == 2
