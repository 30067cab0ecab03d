"""Fast feedback, measured in one run against the last recorded figures: the default loop's stage times and
peaks (and, with --tests, the README's test command), each as a ratio to REFERENCE. Compare changes side by
side: timings on a shared 2-core machine move by 20-50 % between runs, so run the baseline in the same session.

    python bench/feedback.py             # the default loop in a fresh temp workspace (about 9 min idle, 2 cores)
    python bench/feedback.py --tests     # + `pytest -q` (the README's second command, without set-up)
    python bench/feedback.py --tiny      # smoke: the tiny random Llama, 2 steps (ratios are meaningless)

Writes bench/out/feedback.json.
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from pipeline_costs import run, summary_json, tiny_params, workspace  # noqa: E402

# The figures this bench compares with: README's fresh-clone run of 2026-12-02 (idle 2-core VM) and its test command.
REFERENCE = {
    "loop_s": 499.0, "loop_peak_rss_mb": 2070.0, "tests_s": 3821.0, "tests_passed": 456,
    "stage_seconds": {"prepare": 11.6, "model_stage": 636.2, "ms.base_model": 41.5, "ms.quantize_base": 14.2,
                      "ms.train_qlora": 293.4, "ms.train_lora": 221.6, "ms.eval_base": 14.3, "ms.eval_lora": 16.0,
                      "ms.eval_qlora": 14.6, "ms.merge": 5.1, "ms.eval_merged": 13.2, "register": 0.3},
    "stage_peak_mb": {"prepare": 513, "model_stage": 2024, "ms.base_model": 1810, "ms.quantize_base": 2024,
                      "ms.train_qlora": 1019, "ms.train_lora": 1330, "ms.eval_base": 1604, "ms.eval_lora": 1686,
                      "ms.eval_qlora": 1481, "ms.merge": 1649, "ms.eval_merged": 1866, "register": 1354},
}


def timed_loop(tiny: bool) -> dict:
    """One `qlora-ops run` in a fresh workspace: wall seconds, the summary's stage seconds and peaks, and the
    whole command's peak RSS."""
    with tempfile.TemporaryDirectory() as t:
        ws = workspace(Path(t) / "repo")
        params = tiny_params(ws, Path(t)) if tiny else "params/default.yaml"
        t0 = time.time()
        run(ws, params)
        s = summary_json(ws)
    # the largest process of the command's tree (as /usr/bin/time -v reports it): this bench starts nothing else first
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"loop_s": time.time() - t0, "stage_seconds": s["stage_seconds"], "stage_peak_mb": s.get("stage_peak_mb") or {},
            "loop_peak_rss_mb": rss_mb}


def timed_tests() -> dict:
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True,
                       text=True)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    m = re.search(r"(\d+) passed", tail)
    return {"tests_s": time.time() - t0, "tests_passed": int(m.group(1)) if m else 0, "tests_tail": tail}


def ratio(now, ref) -> str:
    return f"{now / ref:6.2f}x" if now and ref else "     -"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tests", action="store_true")
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    res = timed_loop(a.tiny)
    if a.tests:
        res |= timed_tests()
    print(f"{'measure':<28}{'now':>10}{'reference':>11}{'ratio':>9}")
    for k in ("loop_s", "loop_peak_rss_mb", "tests_s", "tests_passed"):
        if res.get(k) is not None:
            print(f"{k:<28}{res[k]:>10.1f}{REFERENCE[k]:>11.1f}{ratio(res[k], REFERENCE[k]):>9}")
    for group, unit in (("stage_seconds", "s"), ("stage_peak_mb", "MiB")):
        for k, ref in REFERENCE[group].items():
            now = res[group].get(k)
            if now is not None:
                print(f"{k + ' ' + unit:<28}{now:>10.1f}{ref:>11.1f}{ratio(now, ref):>9}")
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "feedback.json").write_text(json.dumps({"now": res, "reference": REFERENCE}, indent=2))


if __name__ == "__main__":
    main()
