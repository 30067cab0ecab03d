"""What the pipeline costs around the training: the whole `qlora-ops run` against the sum of its
stages (orchestration, DVC and MLflow tax), an unchanged rerun against the first run (it must end
Skipped at <= 5 % of the first run's wall time), and the time to the first training step on a fresh
workspace (base model conversion included).

    python bench/pipeline_costs.py           # the default loop (embedded SmolLM2, params/default.yaml)
    python bench/pipeline_costs.py --tiny    # tiny random Llama, 2 steps (smoke run; tests use this)

It copies this checkout into a fresh temp git + DVC workspace and runs the real CLI there twice, as a
user would (Prefect's temporary server, the local MLflow store), reading the stage seconds from the
run's summary.json and the first step's clock from the QLoRA run's history. Writes
bench/out/pipeline_costs.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
COPY = ["dvc.yaml", "params/default.yaml", "tasks", "flows", ".dvc/config", ".dvcignore", ".gitignore", "pyproject.toml"]
TOP = ("prepare", "model_stage", "register")  # the parent flow's own stages; the rest are inside model_stage


def workspace(dst: Path) -> Path:
    dst.mkdir(parents=True)
    for rel in COPY:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / rel).is_dir():
            shutil.copytree(ROOT / rel, dst / rel, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / rel, dst / rel)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=b@b", "-c", "user.name=b", "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=dst, check=True)
    return dst


def tiny_params(ws: Path, work: Path) -> str:
    sys.path.insert(0, str(ROOT / "bench"))
    from train_throughput import TINY, build_model

    model = build_model(TINY, work / "tiny-model")
    p = {"model": {"source": str(model), "max_seq_len": 96}, "data": {"prepared": "data/prepared/tiny"},
         "training": {"max_steps": 2, "batch_size": 4, "eval_every": 2, "save_every": 2, "threads": 1, "warmup_steps": 0},
         "eval": {"batch_size": 16, "max_new_tokens": 4, "max_examples": 16},
         "gates": {"min_gain_over_base": -1.0, "min_retention_vs_lora": 0.0, "max_merge_disagreement": 1.0},
         "registry": {"model_name": "bench-tiny"}}
    (ws / "params" / "tiny.yaml").write_text(yaml.safe_dump(p))
    return "params/tiny.yaml"


def run(ws: Path, params: str) -> tuple[float, str]:
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "qlora_ops.flows.cli", "run", "--params", params, "--workspace", str(ws)],
                       # nothing of the caller's MLflow/Prefect settings (a test process may hold another
                       # store's MLFLOW_TRACKING_URI): the fresh workspace's own local stores, as on a laptop
                       cwd=ws, env={**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))},
                                    "PYTHONPATH": str(ws), "QLORA_OPS_PROGRESS": "off",
                                    "PREFECT_HOME": str(ws.parent / "prefect-home"),
                                    # a loaded machine starts Prefect's temporary server slowly: wait, don't fail
                                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600"},
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"run failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return time.time() - t, r.stdout + r.stderr  # the summary goes through the console logger (stderr)


def summary_json(ws: Path) -> dict:
    """The first run's summary.json, from the local MLflow store's artifacts."""
    found = sorted((ws / ".qlora-ops").rglob("summary.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        work = Path(t)
        ws = workspace(work / "repo")
        params = tiny_params(ws, work) if a.tiny else "params/default.yaml"
        t0 = time.time()
        first, out1 = run(ws, params)
        s = summary_json(ws)
        hist = sorted((ws / ".qlora-ops" / "runs").glob("train-qlora-*/history.jsonl"))
        first_step = json.loads(hist[0].read_text().splitlines()[0])["time"] - t0
        rerun, out2 = run(ws, params)
        skipped = "qlora-ops: skipped." in out2
    st = s["stage_seconds"]
    stages = sum(st.get(k, 0) for k in TOP)
    res = {"first_run_s": first, "flow_total_s": st.get("total"), "sum_of_stages_s": stages,
           "tax_s": first - stages, "tax_share": (first - stages) / first, "rerun_s": rerun, "rerun_skipped": skipped,
           "rerun_over_first": rerun / first, "first_training_step_s": first_step,
           "base_model_s": st.get("ms.base_model"), "stage_seconds": st, "stage_peak_mb": s.get("stage_peak_mb")}
    print(f"{'measure':<58}{'seconds':>10}")
    for name, v in (("first run: whole command", first), ("  flow's own total", st.get("total", 0)),
                    ("  sum of its stages (prepare+model_stage+register)", stages),
                    ("  tax: command - stages (startup, Prefect, DVC, MLflow)", first - stages),
                    ("unchanged rerun (ends Skipped)" if skipped else "rerun (NOT skipped)", rerun),
                    ("fresh workspace -> first training step", first_step),
                    ("  of which base model conversion", st.get("ms.base_model", 0))):
        print(f"{name:<58}{v:>10.1f}")
    print(f"tax share of the first run {100 * res['tax_share']:.1f} %   rerun / first run {100 * res['rerun_over_first']:.1f} %")
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "pipeline_costs.json").write_text(json.dumps(res, indent=2))
    (out / "pipeline_costs_runs.log").write_text(f"# first run\n{out1}\n# rerun\n{out2}")  # what a user saw


if __name__ == "__main__":
    main()
