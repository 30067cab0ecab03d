"""Serving, proven equal to what was evaluated: real `mlflow server` (SQLite, with registry webhooks),
real scoring servers (`qlora-ops serve` = `mlflow models serve --env-manager local`) on 127.0.0.1, the
real CLI, a model registered through the real log path and evaluated by tasks.evaluate.

A tiny random Llama (merged_model_dir) stands in for the merged model: its answers are noise, but
noise that a changed dtype or system prompt changes, which is what a parity check must see.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, free_port, tail, tiny_params, wait_http, write_toy_splits

SYSTEM = "Answer with the label."  # write_toy_splits' system prompt: the run's data.system_prompt
pytestmark = pytest.mark.slow  # scoring servers load the model in their own processes


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real `mlflow server` on SQLite with registry webhooks able to call 127.0.0.1 (MLflow blocks
    private addresses and plain http by default: a team deploys the receiver behind https or sets these)."""
    from cryptography.fernet import Fernet

    d = tmp_path_factory.mktemp("mlflow-hooks")
    port = free_port()
    env = {**os.environ, "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true", "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
           "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(), "MLFLOW_WEBHOOK_CACHE_TTL": "1"}
    log = d / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                                 "--backend-store-uri", f"sqlite:///{d}/mlflow.db", "--artifacts-destination",
                                 str(d / "artifacts"), "--workers", "1"], stdout=fh, stderr=subprocess.STDOUT, cwd=d,
                                env=env, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=240)
        yield {"uri": f"http://127.0.0.1:{port}", "dir": d, "log": log}
    finally:
        from tests.conftest import stop_process_group
        stop_process_group(proc)


@pytest.fixture
def tracking(registry, monkeypatch):
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    prev = getattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    mlflow.set_tracking_uri(registry["uri"])
    yield registry["uri"]
    mlflow.set_tracking_uri(prev)


@pytest.fixture(scope="module")
def evaluation(merged_model_dir, tmp_path_factory):
    """The merged model evaluated by tasks.evaluate on the toy test split (what a run saves)."""
    from tasks.evaluate import evaluate_model

    d = tmp_path_factory.mktemp("evaluated")
    data = write_toy_splits(d / "data")
    evaluate_model(tiny_params(merged_model_dir), "merged", merged_model_dir, data / "test.jsonl", d / "eval", as_saved=True)
    return {"test": data / "test.jsonl", "eval": d / "eval"}


def register_evaluated(merged_dir: Path, evaluation: dict, tmp: Path, system_prompt: str = SYSTEM,
                       name: str | None = None) -> tuple[str, int]:
    """A version as the flow leaves it: its run holds data/prepared/test.jsonl, eval/merged/* and the
    params; the model logged by the real log path (serving.json's system prompt = `system_prompt`)."""
    from mlflow.tracking import MlflowClient

    from tasks.register import log_merged_model, register_and_promote
    from tasks.util import read_json

    name = name or f"serve-{uuid.uuid4().hex[:8]}"
    c = MlflowClient()
    run_id = c.create_run(c.create_experiment(f"exp-{name}")).info.run_id
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
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "QLORA_OPS_"))}
    return {**env, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def qlora_ops(ws: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args, "--workspace", str(ws)], cwd=ws, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


class Served:
    """`qlora-ops serve ...` running in the background (the real CLI), stopped by the test."""

    def __init__(self, ws: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = ws / f"serve-{self.port}.log"
        with open(self.log, "w") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", *args, "--port", str(self.port),
                                          "--workspace", str(ws)], cwd=ws, env=cli_env(), stdout=fh,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self):
        try:
            wait_http(f"{self.url}/ping", self.proc, timeout=420)
        except Exception as e:
            self.__exit__()
            raise AssertionError(f"qlora-ops serve did not come up: {e}\n{tail(self.log)}") from None
        return self

    def __exit__(self, *exc):
        from tests.conftest import stop_process_group
        stop_process_group(self.proc)


# ---------------------------------------------------------------- tests

def test_served_champion_passes_parity_and_gets_the_serving_alias(tracking, merged_model_dir, evaluation, tmp_path):
    """`qlora-ops serve --alias champion` (digest checked, MLflow's scoring server on 127.0.0.1) answers
    every test row exactly as evaluated; `verify-serving` says so, tags the version, moves `serving`."""
    from mlflow.tracking import MlflowClient

    name, v = register_evaluated(merged_model_dir, evaluation, tmp_path)
    rel = write_params(tmp_path, tracking, name, merged_model_dir)
    with Served(tmp_path, "--params", rel, "--alias", "champion") as s:
        assert "127.0.0.1" in s.url
        r = qlora_ops(tmp_path, "verify-serving", s.url, "--version", str(v), "--params", rel)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "0/16 answers differ" in r.stdout and "PASS" in r.stdout and f"'serving' -> v{v}" in r.stdout
    c = MlflowClient()
    assert c.get_model_version_by_alias(name, "serving").version == str(v)
    t = c.get_model_version(name, str(v)).tags
    assert t["serving_check"] == "passed" and t["serving_disagreement"] == "0.0000"
    assert t["serving_metric"].startswith("exact_match=")
    parity = json.loads(Path(c.download_artifacts(t["mlflow_run_id"], "serving/parity.json", str(tmp_path))).read_text())
    assert parity["n"] == 16 and parity["differ"] == 0 and parity["endpoint"]["dtype"] == "float32"


def test_served_in_another_dtype_is_caught_and_named(tracking, merged_model_dir, evaluation, tmp_path):
    """The same version served in bfloat16: answers differ, the check fails and names the dtype, and
    `serving` never moves to it."""
    from mlflow.tracking import MlflowClient

    name, v = register_evaluated(merged_model_dir, evaluation, tmp_path)
    rel = write_params(tmp_path, tracking, name, merged_model_dir)
    with Served(tmp_path, "--params", rel, "--version", str(v), "--dtype", "bfloat16") as s:
        r = qlora_ops(tmp_path, "verify-serving", s.url, "--version", str(v), "--params", rel)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "FAIL" in r.stdout and "cause: dtype: served in bfloat16, evaluated in float32" in r.stdout, r.stdout
    assert "system prompt" not in r.stdout  # only what differs is named
    c = MlflowClient()
    assert "serving" not in (c.get_registered_model(name).aliases or {})
    t = c.get_model_version(name, str(v)).tags
    assert t["serving_check"] == "failed" and float(t["serving_disagreement"]) > 0.02
    assert "dtype" in t["serving_check_detail"]


def test_missing_system_prompt_is_caught_and_named(tracking, merged_model_dir, evaluation, tmp_path):
    """A version whose served copy lost its system prompt (serving.json says ""), checked through the
    library path (the one the webhook receiver takes): caught, the system prompt named."""
    from tasks import serving_ops as so

    name, v = register_evaluated(merged_model_dir, evaluation, tmp_path, system_prompt="")
    local, digest = so.fetch_model(name, v, tmp_path / "model")
    with so.scoring_server(local, digest, free_port()) as url:
        res = so.verify_serving(url, name, v, 0.02, 0.95, tmp_path / "work")
    assert not res["passed"] and not res["alias_moved"] and res["differ"] > 0, so.explain(res)
    assert res["causes"] == [f"system prompt: the endpoint's default system prompt is not data.system_prompt of "
                             f"the evaluated run {res['run_id']}"]


def test_a_tampered_version_is_never_served(tracking, merged_model_dir, evaluation, tmp_path, registry):
    """`qlora-ops serve` checks the bytes against the version's digest before starting anything; the
    scoring server's own loader refuses them too when started by hand with the digest."""
    from tasks import serving_ops as so

    name, v = register_evaluated(merged_model_dir, evaluation, tmp_path)
    rel = write_params(tmp_path, tracking, name, merged_model_dir)
    local, digest = so.fetch_model(name, v, tmp_path / "good")
    from mlflow.tracking import MlflowClient
    model_id = MlflowClient().get_model_version(name, str(v)).model_id
    stored = list(registry["dir"].glob(f"artifacts/**/{model_id}/artifacts/data/model/tokenizer.json"))
    assert len(stored) == 1, stored
    before = stored[0].read_text()
    after = before.replace('"<|im_end|>"', '"<|im_END|>"', 1)  # a chat-template token renamed, same size
    assert after != before
    stored[0].write_text(after)
    r = qlora_ops(tmp_path, "serve", "--version", str(v), "--params", rel, "--port", str(free_port()))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "tokenizer.json" in r.stderr and "refusing to load" in r.stderr

    (local / "data" / "model" / "config.json").write_text("{}")  # the checked copy changed after the check
    proc = subprocess.run(so.server_command(local, "127.0.0.1", free_port()), env=so.server_env(digest),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "refusing to load" in proc.stdout + proc.stderr


def _sign(secret: str, delivery: str, ts: str, body: str) -> str:
    mac = hmac.new(secret.encode(), f"{delivery}.{ts}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def test_champion_alias_webhook_checks_and_moves_serving(tracking, merged_model_dir, evaluation, tmp_path):
    """MLflow's registry webhook (model_version_alias.created, delivered by the real server) reaches the
    receiver; a bad signature is refused; the new champion's parity is checked on a scoring server the
    receiver starts, and `serving` moves only after the check passed."""
    from mlflow.tracking import MlflowClient

    from tasks import webhook

    name, v1 = register_evaluated(merged_model_dir, evaluation, tmp_path)
    secret = uuid.uuid4().hex
    rec = webhook.Receiver(secret, webhook.champion_checker(name, "champion", threshold=0.02, confidence=0.95,
                                                            work=tmp_path / "hook"), port=free_port())
    with rec:
        c = MlflowClient()
        hook = webhook.ensure_webhook(c, rec.url, secret, name)
        try:
            # An unsigned / wrongly signed alias event is refused before anything runs.
            body = json.dumps({"entity": "model_version_alias", "action": "created",
                               "data": {"name": name, "alias": "champion", "version": str(v1)}})
            ts = str(int(time.time()))
            for sig in ("v1,AAAA", _sign("not-the-secret", "d1", ts, body), None):
                headers = {"Content-Type": "application/json", "X-MLflow-Delivery-Id": "d1", "X-MLflow-Timestamp": ts}
                if sig:
                    headers["X-MLflow-Signature"] = sig
                req = urllib.request.Request(rec.url, data=body.encode(), headers=headers)
                with pytest.raises(urllib.error.HTTPError) as e:
                    urllib.request.urlopen(req, timeout=30)
                assert e.value.code == 401
            assert rec.handled == []

            # The policy moves the champion (here by hand): MLflow calls the receiver, which checks and moves serving.
            c.set_registered_model_alias(name, "champion", str(v1))
            deadline = time.time() + 480
            while time.time() < deadline and not rec.handled:
                time.sleep(1)
            assert rec.handled, f"no signed delivery reached the receiver\n{rec.errors}"
            assert rec.errors == [], rec.errors
            res = rec.handled[-1]
            assert res["version"] == v1 and res["passed"] and res["alias_moved"], res
            assert c.get_model_version_by_alias(name, "serving").version == str(v1)
            assert c.get_model_version(name, str(v1)).tags["serving_check"] == "passed"
        finally:
            c.delete_webhook(hook.webhook_id)
