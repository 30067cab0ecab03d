"""MLflow run bookkeeping: params, data/code versions, per-model metrics, training curves, gates.

Everything goes through MlflowClient with explicit run ids (no thread-local "active run"), so
Prefect's task threads can't log into the wrong run. The tracking URI is set by the entry point.
"""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from qlora_ops.tasks.core import lockfile
from qlora_ops.tasks.core.config import Params, ParamsError
from qlora_ops.tasks.registry.register import ABANDONED, DEFERRED, INCOMPLETE, create_experiment
from qlora_ops.tasks.core.secrets import redact_url
from qlora_ops.tasks.core.util import read_jsonl


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, type(None))) else str(v)
    return out


def ensure_experiment(name: str, local_artifact_root: str | None, remote: bool) -> str:
    """The experiment's id, creating it if missing. Against a remote tracking server the server picks
    the artifact location (its proxied store); a worker-local `file://` location would strand every
    artifact on one machine, so an existing experiment with one is refused, not used."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        return create_experiment(name, None if remote else local_artifact_root)
    loc = exp.artifact_location or ""
    if remote and (loc.startswith("file:") or loc.startswith("/")):
        raise ParamsError(f"registry.experiment={name!r}: this experiment stores its artifacts at {loc}, a path only "
                          "one machine has, so models registered from it could not be loaded elsewhere. Set "
                          "registry.experiment to a new name (the server then uses its shared artifact store)")
    return exp.experiment_id


def find_fingerprint(model_name: str, experiment_id: str, fingerprint: str) -> str | None:
    """Why a run with this fingerprint has nothing new to do (a registered version or a finished run
    that already decided on these exact inputs), or None."""
    c = MlflowClient()
    # A version whose run died halfway (status incomplete/abandoned), or whose run could not compare it with
    # the champion (deferred), decided nothing; it does not count.
    versions = [v for v in c.search_model_versions(f"name = '{model_name}' and tags.fingerprint = '{fingerprint}'")
                if v.tags.get("status") not in (INCOMPLETE, ABANDONED, DEFERRED)]
    if versions:
        v = max(versions, key=lambda mv: int(mv.version))
        return f"{model_name} v{v.version} was registered from the same inputs (fingerprint {fingerprint})"
    runs = c.search_runs([experiment_id], f"tags.`qlora_ops.fingerprint` = '{fingerprint}' and "
                                          "attributes.status = 'FINISHED' and tags.`qlora_ops.outcome` != 'deferred'",
                         max_results=1, order_by=["attributes.start_time DESC"])
    if runs:
        r = runs[0]
        return (f"MLflow run {r.info.run_id} already ended {r.data.tags.get('qlora_ops.outcome', 'finished')} "
                f"on the same inputs (fingerprint {fingerprint})")
    return None


def log_dir(run_id: str, local_dir: Path, artifact_path: str) -> str:
    """Upload a directory to the run's artifact store; returns its runs:/ URI."""
    MlflowClient().log_artifacts(run_id, str(local_dir), artifact_path)
    return f"runs:/{run_id}/{artifact_path}"


def log_files(run_id: str, files: list[Path], artifact_path: str) -> None:
    c = MlflowClient()
    for f in files:
        c.log_artifact(run_id, str(f), artifact_path)


def logged_params(params: Params) -> dict[str, str]:
    """The params as the run logs them (flat keys, string values)."""
    # URLs in params (tracking URI, remotes, sources) may carry a password: never log one.
    return {k: redact_url(v)[:6000] for k, v in flatten(params.model_dump(mode="json")).items()}


def start_run(params: Params, experiment_id: str, tags: dict[str, str], run_name: str) -> str:
    """A run with the params logged and, besides the caller's tags, what it ran on: the lock's hash and the
    versions of torch, transformers, peft, bitsandbytes, accelerate (tasks.core.lockfile.run_tags)."""
    c = MlflowClient()
    run = c.create_run(experiment_id, run_name=run_name, tags={**lockfile.run_tags(), **tags})
    items = [Param(k, v) for k, v in logged_params(params).items()]
    for i in range(0, len(items), 100):
        c.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    import time
    ts = int(time.time() * 1000)
    ms = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
    for i in range(0, len(ms), 500):
        MlflowClient().log_batch(run_id, metrics=ms[i:i + 500])


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    MlflowClient().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_training(parent_run_id: str, experiment_id: str, result: dict) -> str:
    """A nested run per training kind holding its curves (train/val loss, lr, tokens/s, memory)."""
    c = MlflowClient()
    kind = result["kind"]
    child = c.create_run(experiment_id, run_name=f"train-{kind}",
                         tags={"mlflow.parentRunId": parent_run_id, "qlora_ops.kind": kind})
    cid = child.info.run_id
    ms = []
    for h in read_jsonl(Path(result["history"])):
        ts = int(h["time"] * 1000)
        for k in ("train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_bytes"):
            if k in h:
                ms.append(Metric(k, float(h[k]), ts, h["step"]))
    for i in range(0, len(ms), 500):
        c.log_batch(cid, metrics=ms[i:i + 500])
    # processes: the world size that trained it (tokens/s, memory and seconds are per that many devices)
    summary = {k: result[k] for k in ("trainable_share", "trainable_params", "weight_bytes", "peak_mem_bytes",
                                      "mean_tokens_per_s", "train_seconds", "final_val_loss", "processes")
               if result.get(k) is not None}
    log_metrics(cid, summary)
    set_tags(cid, {"optimizer": result["optimizer"], "device": result["device"],
                   "resumed_from": result.get("resumed_from")})
    log_metrics(parent_run_id, {f"{kind}.{k}": v for k, v in summary.items()})
    c.set_terminated(cid)
    return cid


def log_json(run_id: str, obj, name: str) -> None:
    MlflowClient().log_text(run_id, json.dumps(obj, indent=2, sort_keys=True, default=str), name)


def end_run(run_id: str, status: str) -> None:
    MlflowClient().set_terminated(run_id, status=status)
