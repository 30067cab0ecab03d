"""The benchmark script runs end to end (tiny model, 2 steps): no timing asserted, only that it
measures both kinds and prints the comparison, so it does not rot between GPU sessions."""
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def test_throughput_bench_runs_and_compares_both_kinds():
    r = subprocess.run([sys.executable, "bench/train_throughput.py", "--tiny", "--steps", "2", "--batch-size", "4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "QLoRA/LoRA" in r.stdout and "tokens/s (steady)" in r.stdout
    out = json.loads((ROOT / "bench" / "out" / "throughput.json").read_text())
    assert out["qlora"]["weight_bytes"] < out["lora"]["weight_bytes"]
    assert out["qlora"]["steps"] == out["lora"]["steps"] == 2


def _bench(*args: str) -> subprocess.CompletedProcess:
    # generous: pipeline_costs runs the real CLI twice (slow on a loaded 2-core machine)
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=1700)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


def test_memory_probe_bench_reports_load_and_steps():
    r = _bench("bench/memory_probe.py", "qlora", "--tiny", "--steps", "2")
    for line in ("imports", "4-bit copy ready", "model loaded", "LoRA added", "forward 1", "step 1"):
        assert any(ln.startswith(line) and "MiB" in ln for ln in r.stdout.splitlines()), (line, r.stdout)


@pytest.mark.slow
def test_plain_vs_ours_bench_measures_every_run():
    r = _bench("bench/plain_vs_ours.py", "--tiny", "--steps", "2", "--configs", "default")
    assert "ours_over_plain_tokens_per_s_qlora" in r.stdout and "plain_lora" in r.stdout
    res = json.loads((ROOT / "bench" / "out" / "plain_vs_ours.json").read_text())["results"]["default"]
    for run in ("ours_qlora", "plain_qlora", "ours_lora", "plain_lora"):
        assert res[run]["peak"] > res[run]["after_import"] > 0 and res[run]["tokens_per_s"] > 0, run


def test_footprint_bench_is_at_the_nf4_limit():
    r = _bench("bench/footprint.py")
    assert "4.1270 bits per quantized parameter" in r.stdout
    rows = {ln.split()[0]: ln.split() for ln in r.stdout.splitlines() if ln[:3] in ("135", "1B ", "7B ", "70B")}
    assert set(rows) == {"135M", "1B", "7B", "70B"}, r.stdout
    bits = {k: float(v[-3]) for k, v in rows.items()}  # bits/param of the whole model, bf16 parts included
    assert bits["135M"] > bits["1B"] > bits["7B"] > bits["70B"] > 4.127  # the bigger, the closer to the limit
    assert bits["70B"] < 4.3


@pytest.mark.slow
def test_pipeline_costs_bench_runs_twice_and_the_rerun_is_skipped():
    r = _bench("bench/pipeline_costs.py", "--tiny")
    res = json.loads((ROOT / "bench" / "out" / "pipeline_costs.json").read_text())
    assert res["rerun_skipped"] and res["rerun_s"] < res["first_run_s"], r.stdout
    assert 0 < res["sum_of_stages_s"] < res["first_run_s"] and res["first_training_step_s"] > 0
    assert res["stage_peak_mb"]["ms.train_qlora"] > 0


def test_gpu_check_says_what_it_needs_and_would_run():
    """bench/gpu_check.py runs only on CUDA; here it must refuse clearly (exit 3) and name its checks."""
    import torch

    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if torch.cuda.is_available():
        assert r.returncode == 0, r.stderr
    else:
        assert r.returncode == 3 and "needs a CUDA GPU" in r.stderr, r.stdout + r.stderr
    assert "env, loop, memory, ddp, hygiene" in r.stdout + r.stderr
