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
from flows.runtime import stage
from tasks import gate, register, tracking
from tasks.base_model import base_identity
from tasks.config import Params
from tasks.data import DataError
from tasks.paths import state_dir, tracking_uri
from tasks.util import read_json, sha256_file
from tasks.versioning import code_version, source_hash

RESULT = "model_stage.json"
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

    base = stage(pt.resolve_base, p, "base_model")(p, ws)
    base_id = base_identity(Path(base))
    data_hash = key(sha256_file(prepared / "train.jsonl"), sha256_file(prepared / "val.jsonl"))
    train_code = source_hash("train.py", "modeling.py", "prompting.py", "config.py")
    train_key = key(data_hash, base_id, train_code, p.digest("seed", "model", "quantization", "lora", "training"))

    results = {}
    for kind in ("qlora", "lora"):
        results[kind] = stage(pt.train_adapter, p, "train")(p, base, str(prepared), str(sd / "runs" / f"train-{kind}-{train_key}"), kind)
        tracking.log_training(run_id, exp_id, results[kind])
        tracking.log_dir(run_id, Path(results[kind]["adapter_dir"]), f"adapters/{kind}")

    eval_key = key(test_hash, train_code, source_hash("evaluate.py", "modeling.py"), p.digest("eval", "quantization", "seed"))
    cache = sd / "cache" / "eval"

    def evaluate(name: str, cache_key: str | None, model_dir: str, **kw) -> dict:
        """Once per (model, test set, eval params, code) key; a hit reads metrics.json."""
        out = cache / f"{name}-{cache_key}" if cache_key else work / f"eval-{name}"
        if cache_key and (out / "metrics.json").is_file():
            m = {**read_json(out / "metrics.json"), "cached": True}
        else:
            m = stage(pt.evaluate_model, p, "evaluate")(p, name, model_dir, str(test_path), str(out), **kw)
        tracking.log_files(run_id, [out / "predictions.jsonl", out / "metrics.json"], f"eval/{name}")
        return m

    models = {
        "base": evaluate("base", key(eval_key, base_id), base),
        "lora": evaluate("lora", key(eval_key, train_key), base, adapter_dir=results["lora"]["adapter_dir"]),
        "qlora": evaluate("qlora", key(eval_key, train_key), base, adapter_dir=results["qlora"]["adapter_dir"],
                          quantized=True),
    }
    out = {"models": models, "model_uri": None, "champion_scores": {}, "code": code_version(),
           "worker": {"host": socket.gethostname(), "workspace": str(ws), "pid": os.getpid()},
           "training": {k: {x: r.get(x) for x in ("optimizer", "device", "train_seconds", "peak_mem_bytes",
                                                 "mean_tokens_per_s", "final_val_loss", "resumed_from")}
                        for k, r in results.items()}}
    # Merging is only worth doing for a candidate the pre-merge gates accept; the parent decides again.
    if gate.passed(gate.pre_merge_gates(p.gates, models["base"]["accuracy"], models["lora"]["accuracy"],
                                        models["qlora"]["accuracy"])):
        merged_dir = work / "merged"
        stage(pt.merge_adapter, p, "merge")(p, base, results["qlora"]["adapter_dir"], str(merged_dir))
        # Not cached: this re-check is of the bytes we are about to log and register.
        models["merged"] = evaluate("merged", None, str(merged_dir))
        out["model_uri"] = stage(pt.log_model, p, "registry")(
            str(merged_dir), {"system_prompt": p.data.system_prompt, "max_new_tokens": p.eval.max_new_tokens}, run_id)
        shutil.rmtree(merged_dir, ignore_errors=True)  # the artifact store holds its copy
        out["champion_scores"] = champion_scores(p, test_hash, str(test_path), work)
    tracking.log_json(run_id, out, RESULT)
    return out


def champion_scores(p: Params, test_hash: str, test_path: str, work: Path) -> dict[str, float]:
    """The current champion's accuracy on this test set when its version does not carry one yet:
    evaluating a model is GPU work, so it happens here rather than under the parent's registry lock."""
    info = register.champion_info(p.registry.model_name, p.registry.champion_alias)
    if info is None or register.known_champion_score(info["tags"], METRIC, test_hash) is not None:
        return {}
    local = register.download_hf_model(p.registry.model_name, info["version"], work / "champion")
    m = stage(pt.evaluate_model, p, "evaluate")(p, "champion", str(local), test_path, str(work / "eval-champion"))
    shutil.rmtree(work / "champion", ignore_errors=True)
    return {str(info["version"]): m["accuracy"]}
