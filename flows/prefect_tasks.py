"""Thin Prefect wrappers around the plain stage functions (tests call the plain functions).

NO_CACHE and no result persistence: Prefect's default cache key includes the flow run id and
pickles results; our stages cache themselves on content (data hash + params hash + code hash ->
run dir with result.json) and pass only paths, URIs and small JSON between each other.
Timeouts and retries are set per call from params (flows.stages.stage).

Every stage that holds a model runs in a child process that returns (tasks.core.child; trainings in their
own, tasks.train.process): this process keeps Prefect, MLflow and torch imported (~640 MiB), and a model
loaded on top of that, with what glibc kept of the last one, was the loop's peak (bench/RESULTS.md).
"""
from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from qlora_ops.tasks.core.child import call_in_child
from qlora_ops.tasks.model import base as base_model
from qlora_ops.tasks.registry import register
from qlora_ops.tasks.train import process as train_process
from qlora_ops.tasks.data import versioning

_opts = dict(cache_policy=NO_CACHE, persist_result=False)


@task(name="prepare-data", **_opts)
def prepare_data(workspace: Path, params_path: Path, params) -> dict:
    return versioning.prepare_via_dvc(workspace, params_path, params)


@task(name="base-model", **_opts)
def resolve_base(params, workspace: Path) -> str:
    return str(base_model.resolve_base_model(params, workspace))


@task(name="quantize-base", **_opts)
def quantize_base(params, workspace: Path, base_dir: str) -> str:
    return str(base_model.quantized_base(params, workspace, Path(base_dir)))


@task(name="train", task_run_name="train-{kind}", **_opts)
def train_adapter(params, base_dir: str, data_dir: str, out_dir: str, kind: str) -> dict:
    # a fresh process per training: its peak is its own and its memory goes back to the OS (tasks.train.process)
    return train_process.train_subprocess(params, Path(base_dir), Path(data_dir), Path(out_dir), kind, on_log=print)


@task(name="evaluate", task_run_name="evaluate-{name}", **_opts)
def evaluate_model(params, name: str, model_dir: str, test_path: str, out_dir: str,
                   adapter_dir: str | None = None, quantized: bool = False, as_saved: bool = False, **kw) -> dict:
    return call_in_child("qlora_ops.tasks.evaluate.predict:evaluate_model", params, name, Path(model_dir),
                         Path(test_path), Path(out_dir), Path(adapter_dir) if adapter_dir else None, quantized,
                         as_saved, **kw)


@task(name="evaluate-lm-eval", task_run_name="evaluate-lm-eval-{name}", **_opts)
def evaluate_lm_eval(params, name: str, model_dir: str, task_yaml: str, out_dir: str,
                     adapter_dir: str | None = None, quantized: bool = False, as_saved: bool = False, **kw) -> dict:
    # an optional extra (lm-eval): imported only by the child that runs such a suite
    return call_in_child("qlora_ops.tasks.evaluate.lm_eval_suite:evaluate_suite", params, name, Path(model_dir),
                         Path(task_yaml), Path(out_dir), Path(adapter_dir) if adapter_dir else None, quantized,
                         as_saved, **kw)


@task(name="merge", **_opts)
def merge_adapter(params, base_dir: str, adapter_dir: str, out_dir: str, qbase_dir: str) -> dict:
    return call_in_child("qlora_ops.tasks.model.merge:merge", params, Path(base_dir), Path(adapter_dir), Path(out_dir),
                         qbase_dir=Path(qbase_dir))


@task(name="log-model", **_opts)
def log_model(merged_dir: str, serving: dict, run_id: str) -> str:
    return register.log_merged_model(Path(merged_dir), serving, run_id=run_id)


@task(name="register", **_opts)
def register_and_promote(**kw) -> dict:
    return register.register_and_promote(**kw)
