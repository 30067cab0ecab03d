"""The GPU checks of issue 17 in one command, for a session with a CUDA GPU (none has had one so far):

    bash .ci/setup.sh && .venv/bin/python bench/gpu_check.py        # needs CUDA; wall time not measured yet
    .venv/bin/python bench/gpu_check.py --check                     # the script's own smoke test (any machine)

1. env      GPU, compute capability, the compute dtype `quantization.compute_dtype: auto` picks, versions
2. loop     the default loop (`qlora-ops run --params params/default.yaml`, real CLI, fresh temp workspace as
            bench/pipeline_costs.py makes it): its model stage must train on cuda with bf16 compute (on a GPU
            with native bf16) and paged AdamW; scores, stage seconds and peaks
3. memory   QLoRA vs LoRA peak memory and tokens/s: bench/train_throughput.py on SmolLM2-135M and on the
            random-weight 1.1B Llama (--llama-1b), 20 steps each
4. ddp      with 2+ GPUs: `torchrun --nproc_per_node 2 -m qlora_ops.tasks.train` vs 1 process on the default data
            (losses, tokens/s, peak memory); skipped, and said so, with 1 GPU
5. hygiene  release_memory leaves no reserved CUDA memory; quantizing the 4-bit base for a flow leaves the
            calling process without a CUDA context (it runs in a child)

Each check runs in its own process (this one never touches CUDA). Writes bench/out/gpu_check.json and
prints a Markdown block for bench/RESULTS.md; a failed check is recorded with its error, the rest still run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
STEPS = ("env", "loop", "memory", "ddp", "hygiene")


def step_env() -> dict:
    from importlib.metadata import version

    import torch

    from qlora_ops.tasks.core.config import QuantParams
    from qlora_ops.tasks.model.modeling import compute_dtype

    return {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
            "capability": list(torch.cuda.get_device_capability(0)), "is_bf16_supported": torch.cuda.is_bf16_supported(),
            "auto_compute_dtype": str(compute_dtype(QuantParams(), torch.device("cuda"))),
            "versions": {p: version(p) for p in ("torch", "transformers", "peft", "bitsandbytes", "accelerate")}}


def step_loop() -> dict:
    sys.path.insert(0, str(ROOT / "bench"))
    from pipeline_costs import summary_json, workspace

    with tempfile.TemporaryDirectory() as t:
        ws = workspace(Path(t) / "repo")
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))},
               "PYTHONPATH": str(ws), "QLORA_OPS_PROGRESS": "off", "PREFECT_HOME": str(Path(t) / "prefect-home")}
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "qlora_ops.flows.cli", "run", "--params", "params/default.yaml", "--workspace", str(ws)],
                           cwd=ws, env=env, capture_output=True, text=True)
        secs = time.time() - t0
        s = summary_json(ws)
        runs = {k: json.loads(next((ws / ".qlora-ops" / "runs").glob(f"train-{k}-*/result.json")).read_text())
                for k in ("qlora", "lora")}
    keys = ("device", "optimizer", "compute_dtype", "peak_mem_bytes", "mean_tokens_per_s", "train_seconds", "final_val_loss")
    out = {"exit_code": r.returncode, "run_s": round(secs, 1), "outcome": s.get("outcome"),
           "accuracy": {m: v.get("accuracy") for m, v in s.get("models", {}).items()},
           "stage_seconds": s.get("stage_seconds"), "stage_peak_mb": s.get("stage_peak_mb"),
           "training": {k: {x: v.get(x) for x in keys} for k, v in runs.items()}}
    q = out["training"]["qlora"]
    out["trained_as_intended"] = q["device"] == "cuda" and q["optimizer"] == "paged_adamw_32bit" and (
        q["compute_dtype"] == "torch.bfloat16" or step_env()["capability"][0] < 8)
    return out


def step_memory() -> dict:
    out = {}
    for name, args in (("smollm2_135m", []), ("llama_1_1b_random", ["--llama-1b"])):
        r = subprocess.run([sys.executable, "bench/train_throughput.py", "--steps", "20", *args], cwd=ROOT,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"train_throughput {args}: {r.stderr[-2000:]}")
        res = json.loads((ROOT / "bench" / "out" / "throughput.json").read_text())
        out[name] = {"table": r.stdout, **{k: {x: res[k][x] for x in ("peak_mem_bytes", "steady_tokens_per_s", "weight_bytes",
                                                                     "optimizer", "device")} for k in ("qlora", "lora")}}
    return out


def step_ddp() -> dict:
    import torch

    if torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU on this machine; 2-process DDP needs 2"}
    sys.path.insert(0, str(ROOT / "bench"))
    from plain_vs_ours import default_data

    from qlora_ops.tasks.model.base import resolve_base_model
    from qlora_ops.tasks.core.config import Params

    base, data = resolve_base_model(Params(), ROOT), default_data()
    out = {}
    with tempfile.TemporaryDirectory() as t:
        for name, launch in (("1_process", [sys.executable]),
                             ("2_process_ddp", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"])):
            run = Path(t) / name
            r = subprocess.run([*launch, "-m", "qlora_ops.tasks.train", "--params", "params/default.yaml", "--kind", "qlora",
                                "--base-dir", str(base), "--data-dir", str(data), "--out", str(run)],
                               cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{name}: {r.stderr[-2000:]}")
            res = json.loads((run / "result.json").read_text())
            out[name] = {k: res[k] for k in ("processes", "final_train_loss", "final_val_loss", "mean_tokens_per_s",
                                             "peak_mem_bytes", "train_seconds")}
    return out


def step_hygiene() -> dict:
    import torch

    from qlora_ops.tasks.model.base import quantized_base, resolve_base_model
    from qlora_ops.tasks.core.config import Params

    base = resolve_base_model(Params(), ROOT)
    with tempfile.TemporaryDirectory() as t:
        quantized_base(Params(), Path(t), base)  # in a child on CUDA
        after_quantize = torch.cuda.is_initialized()
    from qlora_ops.tasks.core.memory import release_memory
    from qlora_ops.tasks.model.modeling import load_model

    model, _ = load_model(base, Params(), quantized=False)
    loaded = torch.cuda.memory_reserved()
    del model
    release_memory()
    return {"cuda_initialized_after_quantize_base": after_quantize, "reserved_with_model": loaded,
            "reserved_after_release": torch.cuda.memory_reserved()}


def markdown(res: dict) -> str:
    lines = [f"## GPU checks — `python bench/gpu_check.py` ({time.strftime('%Y-%m-%d %H:%M')})", ""]
    for step in STEPS:
        lines += [f"### {step}", "", "```", json.dumps(res.get(step), indent=1, default=str)[:4000], "```", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="only check that the script can run here")
    ap.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # one check, in this (child) process
    a = ap.parse_args()
    if a.step:
        print(json.dumps(globals()[f"step_{a.step}"](), default=str))
        return 0
    has_cuda = subprocess.run([sys.executable, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"],
                              cwd=ROOT).returncode == 0
    if not has_cuda:
        print(f"gpu_check needs a CUDA GPU; none here. Checks it would run: {', '.join(STEPS)}", file=sys.stderr)
        return 3
    if a.check:
        print(f"CUDA present; `python bench/gpu_check.py` would run: {', '.join(STEPS)}")
        return 0
    res = {}
    for step in STEPS:
        t0 = time.time()
        r = subprocess.run([sys.executable, __file__, "--step", step], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        res[step] = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"error": r.stderr[-3000:]}
        res[step + "_seconds"] = round(time.time() - t0, 1)
        print(f"{step}: {'ok' if r.returncode == 0 else 'FAILED'} ({res[step + '_seconds']} s)", flush=True)
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(res, indent=2, default=str))
    print(markdown(res))
    return 0 if all("error" not in res[s] for s in STEPS) else 1


if __name__ == "__main__":
    sys.exit(main())
