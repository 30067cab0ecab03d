"""What the serving and GGUF tests share: a version registered as the flow leaves it, params for the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import yaml

from tests.conftest import ROOT, free_port, stop_process_group, tail, wait_http

SYSTEM = "Answer with the label."  # write_toy_splits' system prompt: the run's data.system_prompt


# The session's Prefect API (tests.conftest `prefect_api`) handed to the CLI subprocesses: `verify-serving` and
# `serve --follow` move `serving` only under the registry slot on a shared store (an http mlflow server is one).
SLOT_API_ENV = "QLORA_TEST_SLOT_PREFECT_API"


# The MLflow login the CLI subprocesses use on a basic-auth server ("user:password"); this process keeps its own.
CLI_LOGIN_ENV = "QLORA_TEST_CLI_MLFLOW_LOGIN"


def use_tracking(uri: str, monkeypatch, prefect=None, login: tuple[str, str] | None = None,
                 cli_login: tuple[str, str] | None = None):
    """Point this process at `uri` for one test (as `login` on a basic-auth server), the CLI subprocesses at
    `prefect`'s API (the registry slot) and as `cli_login` when given; returns the restore function."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    prev = getattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    if login is not None:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", login[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", login[1])
    if cli_login is not None:
        monkeypatch.setenv(CLI_LOGIN_ENV, ":".join(cli_login))
    if prefect is not None:
        monkeypatch.setenv(SLOT_API_ENV, prefect.api)
        monkeypatch.setenv(SLOT_API_ENV + "_HOME", str(prefect.home))
    mlflow.set_tracking_uri(uri)
    return lambda: mlflow.set_tracking_uri(prev)


def register_evaluated(merged_dir: Path, evaluation: dict, tmp: Path, system_prompt: str = SYSTEM,
                       name: str | None = None) -> tuple[str, int]:
    """A version as the flow leaves it: its run holds data/prepared/test.jsonl, eval/merged/* and the
    params; the model logged by the real log path (serving.json's system prompt = `system_prompt`)."""
    from mlflow.tracking import MlflowClient

    from qlora_ops.tasks.registry.register import log_merged_model, register_and_promote
    from qlora_ops.tasks.core.util import read_json

    name = name or f"serve-{uuid.uuid4().hex[:8]}"
    c = MlflowClient()
    exp = c.get_experiment_by_name(f"exp-{name}")
    run_id = c.create_run(exp.experiment_id if exp else c.create_experiment(f"exp-{name}")).info.run_id
    for k, v in {"data.system_prompt": SYSTEM, "eval.batch_size": "8"}.items():
        c.log_param(run_id, k, v)
    c.log_artifact(run_id, str(evaluation["test"]), "data/prepared")
    for f in ("predictions.jsonl", "metrics.json"):
        c.log_artifact(run_id, str(evaluation["eval"] / f), "eval/merged")
    max_new = read_json(evaluation["eval"] / "metrics.json")["max_new_tokens"]
    uri = log_merged_model(merged_dir, {"system_prompt": system_prompt, "max_new_tokens": max_new, "batch_size": 8},
                           run_id=run_id)
    c.set_terminated(run_id)
    res = register_and_promote(model_uri=uri, model_name=name, alias="champion", challenger_alias=None,
                               tags={"mlflow_run_id": run_id}, decide=lambda v: (True, "test"),
                               lock_path=tmp / "registry.lock")
    return name, res["version"]


def write_params(ws: Path, tracking_uri: str, model_name: str, model_dir: Path) -> str:
    (ws / "params").mkdir(parents=True, exist_ok=True)
    p = {"model": {"source": str(model_dir)}, "registry": {"tracking_uri": tracking_uri, "model_name": model_name},
         "gates": {"max_serving_disagreement": 0.02}}
    (ws / "params" / "serve.yaml").write_text(yaml.safe_dump(p))
    return "params/serve.yaml"


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "PREFECT_", "QLORA_OPS_", SLOT_API_ENV, CLI_LOGIN_ENV))}
    if login := os.environ.get(CLI_LOGIN_ENV):
        user, password = login.split(":", 1)
        env.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    if api := os.environ.get(SLOT_API_ENV):
        env.update(PREFECT_API_URL=api, PREFECT_HOME=os.environ[SLOT_API_ENV + "_HOME"],
                   PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return {**env, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def qlora_ops(ws: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlora_ops.flows.cli", *args, "--workspace", str(ws)], cwd=ws, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)




class Served:
    """`qlora-ops serve ...` running in the background (the real CLI), stopped by the test."""

    def __init__(self, ws: Path, *args: str, env: dict[str, str] | None = None, ready: str = "/ping"):
        self.ready = ready
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = ws / f"serve-{self.port}.log"
        with open(self.log, "w") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "qlora_ops.flows.cli", "serve", *args, "--port", str(self.port),
                                          "--workspace", str(ws)], cwd=ws, env={**cli_env(), **(env or {})}, stdout=fh,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self):
        try:
            wait_http(f"{self.url}{self.ready}", self.proc, timeout=420)
        except Exception as e:
            self.__exit__()
            raise AssertionError(f"qlora-ops serve did not come up: {e}\n{tail(self.log)}") from None
        return self

    def __exit__(self, *exc):
        stop_process_group(self.proc)
