"""The GPU stage: everything that needs the model. Train QLoRA and the LoRA baseline, evaluate base /
LoRA / QLoRA on the test split, merge the adapter and evaluate the merged model, evaluate the current
champion on this test set if its score is unknown.

With `orchestration.gpu_pool` set, the parent flow (flows/retrain.py) starts this as its own
deployment on the GPU pool and waits; otherwise it runs in the parent's process. Either way it takes
only versions and URIs (the parent's MLflow run id, where the prepared data is) and leaves
everything a later stage or a user needs in that run's artifact store: adapters, eval predictions,
the merged model (logged as a pyfunc model), and `model_stage.json`, the small result the parent
reads. Nothing here depends on a path the parent's machine has.

    qlora-ops deploy --params params/team.yaml   # creates qlora-model-stage/<deployment> on the GPU pool
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

from prefect import flow

from flows import prefect_tasks as pt
from flows import runtime
from flows.runtime import stage
from tasks import gate, register, registry_ops, tracking
from tasks.base_model import base_identity
from tasks.config import Params
from tasks.data import DataError
from tasks.evaluate import cached_metrics, per_row
from tasks.modeling import compute_dtype, device
from tasks.paths import state_dir, tracking_uri
from tasks.util import sha256_file
from tasks.versioning import code_version, source_hash

RESULT = "model_stage.json"
# Every metric module decides scores (tasks/metrics/__init__.py and each local `evaluate` module).
METRIC_CODE = ("metrics/__init__.py", *(f"metrics/{m}/{m}.py" for m in ("exact_match", "token_f1", "rouge_l", "chrf", "json_match")))
METRIC = "test_accuracy"


def key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def materialize(data_uri: str, dst: Path) -> Path:
    """The prepared data as a local dir: the parent's own dir in-process, else downloaded from MLflow."""
    if Path(data_uri).is_dir():
        return Path(data_uri)
    import mlflow

    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=data_uri, dst_path=str(dst)))


@flow(name="qlora-model-stage", log_prints=True, persist_result=False)
def model_stage(params: dict, run_id: str, data_uri: str, test_hash: str, workspace: str = ".") -> dict:
    import mlflow

    p = Params.model_validate(params)
    ws = Path(workspace).resolve()
    sd = state_dir(ws, p)
    if mlflow.get_tracking_uri() != (uri := tracking_uri(ws, p)):
        mlflow.set_tracking_uri(uri)
    exp_id = mlflow.tracking.MlflowClient().get_run(run_id).info.experiment_id  # fails fast on a wrong server
    work = sd / "model-stage" / run_id
    prepared = materialize(data_uri, work / "data")
    test_path = prepared / "test.jsonl"
    if sha256_file(test_path)[:16] != test_hash:
        raise DataError(f"{data_uri}: test split hash {sha256_file(test_path)[:16]} != {test_hash} announced by the "
                        "parent run; the hand-off is not the data that was versioned")

    timed = runtime.StageTimer()
    times = timed.seconds

    base = timed("base_model", stage(pt.resolve_base, p, "base_model"), p, ws)
    # QLoRA's base, quantized once: a QLoRA training then never reads the full-precision file (its peak)
    qbase = timed("quantize_base", stage(pt.quantize_base, p, "base_model"), p, ws, base)
    base_id = base_identity(Path(base))
    data_hash = key(sha256_file(prepared / "train.jsonl"), sha256_file(prepared / "val.jsonl"))
    train_code = source_hash("train.py", "modeling.py", "prompting.py", "config.py")
    train_key = key(data_hash, base_id, train_code, p.digest("seed", "model", "quantization", "lora", "training"))

    results = {}
    for kind in ("qlora", "lora"):
        results[kind] = timed(f"train_{kind}", stage(pt.train_adapter, p, "train"), p, qbase if kind == "qlora" else base, str(prepared),
                              str(sd / "runs" / f"train-{kind}-{train_key}"), kind)
        tracking.log_training(run_id, exp_id, results[kind])
        tracking.log_dir(run_id, Path(results[kind]["adapter_dir"]), f"adapters/{kind}")

    eval_key = score_key(p, test_hash)
    cache = sd / "cache" / "eval"

    # Cached per (model, score key); the merged model is not: its re-check is of the bytes we register.
    dirs = {"base": cache / f"base-{key(eval_key, base_id)}", "lora": cache / f"lora-{key(eval_key, train_key)}",
            "qlora": cache / f"qlora-{key(eval_key, train_key)}", "merged": work / "eval-merged"}

    def evaluate(name: str, model_dir: str, **kw) -> dict:
        out = dirs[name]
        if name != "merged" and (m := cached_metrics(out)) is not None:
            m = {**m, "cached": True}
        else:
            m = timed(f"eval_{name}", stage(pt.evaluate_model, p, "evaluate"), p, name, model_dir, str(test_path),
                      str(out), **kw)
        tracking.log_files(run_id, [out / "predictions.jsonl", out / "metrics.json"], f"eval/{name}")
        return m

    models = {
        "base": evaluate("base", base),
        "lora": evaluate("lora", base, adapter_dir=results["lora"]["adapter_dir"]),
        "qlora": evaluate("qlora", qbase, adapter_dir=results["qlora"]["adapter_dir"], quantized=True),
    }
    out = {"models": models, "model_uri": None, "champion": None, "score_key": eval_key, "code": code_version(),
           "worker": {"host": socket.gethostname(), "workspace": str(ws), "pid": os.getpid()},
           "training": {k: {x: r.get(x) for x in ("optimizer", "device", "train_seconds", "peak_mem_bytes",
                                                 "mean_tokens_per_s", "final_val_loss", "resumed_from")}
                        for k, r in results.items()}}
    # Per-row results: every gate and the promotion decision are paired comparisons on these rows.
    out["rows"] = rows = {name: per_row(dirs[name]) for name in models}
    # Merging is only worth doing for a candidate the pre-merge gates accept; the parent decides again.
    m = gate.gate_metric(p)
    sc = {name: gate.gate_scores(rows[name], m) for name in ("base", "lora", "qlora")}
    if gate.passed(gate.pre_merge_gates(p.gates, m, sc["base"], sc["lora"], sc["qlora"], seed=p.seed)):
        merged_dir = work / "merged"
        timed("merge", stage(pt.merge_adapter, p, "merge"), p, base, results["qlora"]["adapter_dir"], str(merged_dir), qbase)
        models["merged"] = evaluate("merged", str(merged_dir), as_saved=True)
        rows["merged"] = per_row(dirs["merged"])
        serving = {"system_prompt": p.data.system_prompt, "max_new_tokens": models["merged"]["max_new_tokens"]}
        out["model_uri"] = timed("log_model", stage(pt.log_model, p, "registry"), str(merged_dir), serving, run_id)
        shutil.rmtree(merged_dir, ignore_errors=True)  # the artifact store holds its copy
        out["champion"] = timed("champion", champion_rows, p, eval_key, test_path, work)
    out["stage_seconds"] = times
    # MiB per stage, each from its own start; a training ran in its own process: that process's peak
    out["stage_peak_mb"] = {**timed.peak_mb, **{f"train_{k}": round(r["process_peak_bytes"] / 2**20, 1)
                                                for k, r in results.items() if r.get("process_peak_bytes")}}
    tracking.log_json(run_id, out, RESULT)
    return out


def score_key(p: Params, test_hash: str) -> str:
    """Everything a score depends on: test rows, decoding + metric code, eval params, device and dtype.
    Two models' results are compared row by row only when their score keys match."""
    dev = device()
    return key(test_hash, source_hash("evaluate.py", "modeling.py", "prompting.py", *METRIC_CODE),
               p.digest("eval", "quantization"), dev.type, str(compute_dtype(p.quantization, dev)))


def champion_rows(p: Params, eval_key: str, test_path: Path, work: Path) -> dict | None:
    """The current champion's per-row results on this test set: the predictions its own run saved when
    they were made under the same score key, else a fresh evaluation (GPU work, so it happens here and
    not under the parent's registry lock)."""
    info = register.champion_info(p.registry.model_name, p.registry.champion_alias)
    if info is None:
        return None
    v, tags = info["version"], info["tags"]
    if tags.get("score_key") == eval_key and tags.get("mlflow_run_id"):
        _, rows = registry_ops.version_rows(p.registry.model_name, v, work / "champion-saved")
        return {"version": v, "how": "its own saved predictions (same score key)", **rows}
    local = register.download_hf_model(p.registry.model_name, v, work / "champion")
    out = work / "eval-champion"
    stage(pt.evaluate_model, p, "evaluate")(p, "champion", str(local), str(test_path), str(out), as_saved=True)
    shutil.rmtree(work / "champion", ignore_errors=True)
    return {"version": v, "how": "re-evaluated on this test set", **per_row(out)}
