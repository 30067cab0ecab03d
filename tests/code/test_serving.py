"""Serving, proven equal to what was evaluated: real `mlflow server` (basic-auth, SQLite, registry webhooks),
real scoring servers (`qlora-ops serve` = `mlflow models serve --env-manager local`) on 127.0.0.1, the
real CLI, a model registered through the real log path and evaluated by tasks.evaluate.predict.

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
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import pytest

from tests.code.serving_helpers import Served, cli_env, qlora_ops, register_evaluated, use_tracking, write_params
from tests.conftest import free_port, tail, wait_http
pytestmark = pytest.mark.slow  # scoring servers load the model in their own processes


ADMIN = ("serving-admin", "admin-pw-0123456789")
USER = ("serving-user", "user-pw-0123456789")  # no admin: what a follower and the CLI's users hold


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real `mlflow server --app-name basic-auth` on SQLite (the team stack's setup: webhooks are admin-only)
    with registry webhooks able to call 127.0.0.1 (MLflow blocks private addresses and plain http by default: a
    team deploys the receiver behind https or sets these). Every login but the admin has EDIT by default here,
    so each test's experiments and models need no grants: what it shows is what needs the admin."""
    from cryptography.fernet import Fernet
    from mlflow.server import get_app_client

    d = tmp_path_factory.mktemp("mlflow-hooks")
    (d / "auth.ini").write_text(f"[mlflow]\ndefault_permission = EDIT\ndatabase_uri = sqlite:///{d}/auth.db\n"
                                f"admin_username = {ADMIN[0]}\nadmin_password = {ADMIN[1]}\n"
                                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
           "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true", "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
           "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(), "MLFLOW_WEBHOOK_CACHE_TTL": "1",
           "MLFLOW_AUTH_CONFIG_PATH": str(d / "auth.ini"), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-secret",
           "MLFLOW_AUTH_CACHE_TTL_SECONDS": "600"}  # a PBKDF2 check per request is seconds on 2 loaded cores
    log = d / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host",
                                 "127.0.0.1", "--port", str(port), "--backend-store-uri", f"sqlite:///{d}/mlflow.db",
                                 "--artifacts-destination", str(d / "artifacts"), "--workers", "1"], stdout=fh,
                                stderr=subprocess.STDOUT, cwd=d, env=env, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=240)
        uri = f"http://127.0.0.1:{port}"
        old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
        os.environ.update(MLFLOW_TRACKING_USERNAME=ADMIN[0], MLFLOW_TRACKING_PASSWORD=ADMIN[1])
        try:
            get_app_client("basic-auth", tracking_uri=uri).create_user(*USER)
        finally:
            for k, v in old.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        yield {"uri": uri, "dir": d, "log": log}
    finally:
        from tests.conftest import stop_process_group
        stop_process_group(proc)


@pytest.fixture
def tracking(registry, prefect_api, monkeypatch):
    """This process registers as the admin; the CLI (serve, verify-serving, serve --follow) runs as USER."""
    restore = use_tracking(registry["uri"], monkeypatch, prefect_api, login=ADMIN, cli_login=USER)
    yield registry["uri"]
    restore()


# ---------------------------------------------------------------- tests

def test_served_champion_passes_parity_and_gets_the_serving_alias(tracking, merged_model_dir, evaluated_merged, tmp_path):
    """`qlora-ops serve --alias champion` (digest checked, MLflow's scoring server on 127.0.0.1) answers
    every test row exactly as evaluated; `verify-serving` says so, tags the version, moves `serving`."""
    from mlflow.tracking import MlflowClient

    name, v = register_evaluated(merged_model_dir, evaluated_merged, tmp_path)
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


def test_served_in_another_dtype_is_caught_and_named(tracking, merged_model_dir, evaluated_merged, tmp_path):
    """The same version served in bfloat16: answers differ, the check fails and names the dtype, and
    `serving` never moves to it."""
    from mlflow.tracking import MlflowClient

    name, v = register_evaluated(merged_model_dir, evaluated_merged, tmp_path)
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


def test_missing_system_prompt_is_caught_and_named(tracking, merged_model_dir, evaluated_merged, tmp_path):
    """A version whose served copy lost its system prompt (serving.json says ""), checked through the
    library path (the one the webhook receiver takes): caught, the system prompt named."""
    from qlora_ops.tasks.serving import parity
    from qlora_ops.tasks.serving import server as so

    name, v = register_evaluated(merged_model_dir, evaluated_merged, tmp_path, system_prompt="")
    local, digest = so.fetch_model(name, v, tmp_path / "model")
    with so.scoring_server(local, digest, free_port()) as url:
        res = parity.verify_serving(url, name, v, 0.02, 0.95, tmp_path / "work")
    assert not res["passed"] and not res["alias_moved"] and res["differ"] > 0, parity.explain(res)
    assert res["causes"] == [f"system prompt: the endpoint's default system prompt is not data.system_prompt of "
                             f"the evaluated run {res['run_id']}"]


def test_a_tampered_version_is_never_served(tracking, merged_model_dir, evaluated_merged, tmp_path, registry):
    """`qlora-ops serve` checks the bytes against the version's digest before starting anything; the
    scoring server's own loader refuses them too when started by hand with the digest."""
    from qlora_ops.tasks.serving import server as so

    name, v = register_evaluated(merged_model_dir, evaluated_merged, tmp_path)
    rel = write_params(tmp_path, tracking, name, merged_model_dir)
    local, digest = so.fetch_model(name, v, tmp_path / "good")
    from mlflow.tracking import MlflowClient
    model_id = MlflowClient().get_model_version(name, str(v)).source.removeprefix("models:/")
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


def test_serve_follow_moves_serving_when_the_champion_moves(tracking, merged_model_dir, evaluated_merged, tmp_path):
    """`qlora-ops serve --follow`: the champion earns `serving` by a passed check and is served; a bad
    signature on the webhook receiver is refused; when the policy moves `champion` to a new version, MLflow's
    registry webhook (model_version_alias.created, delivered by the real server, signed) reaches the
    receiver, which checks the new champion on a scoring server of its own, moves `serving` and restarts
    the served endpoint on it."""
    from mlflow.tracking import MlflowClient

    name, v1 = register_evaluated(merged_model_dir, evaluated_merged, tmp_path)
    rel = write_params(tmp_path, tracking, name, merged_model_dir)
    secret, hook_port = uuid.uuid4().hex, free_port()
    hook_url = f"http://127.0.0.1:{hook_port}/"
    # The admin's one step (MLflow's webhook API is admin-only under basic-auth): without the secret refused;
    # with it, the webhook is made, and the follower below only receives (no webhook call of its own).
    admin = [sys.executable, "-m", "qlora_ops.flows.cli", "serving-webhook", "--url", hook_url, "--params", rel,
             "--workspace", str(tmp_path)]
    as_admin = {**cli_env(), "MLFLOW_TRACKING_USERNAME": ADMIN[0], "MLFLOW_TRACKING_PASSWORD": ADMIN[1]}
    r = subprocess.run(admin, cwd=tmp_path, env=as_admin, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "QLORA_OPS_WEBHOOK_SECRET" in r.stderr, r.stdout + r.stderr
    # basic-auth: a login that is not the admin is refused by MLflow (403), and told so
    r = subprocess.run(admin, cwd=tmp_path, env={**cli_env(), "QLORA_OPS_WEBHOOK_SECRET": secret},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 4 and "needs the MLflow admin login" in r.stderr and secret not in r.stdout + r.stderr, \
        r.stdout + r.stderr
    r = subprocess.run(admin, cwd=tmp_path, env={**as_admin, "QLORA_OPS_WEBHOOK_SECRET": secret}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "MLflow webhook" in r.stdout and secret not in r.stdout + r.stderr, r.stdout + r.stderr
    s = Served(tmp_path, "--params", rel, "--follow", "--hook-port", str(hook_port),
               env={"QLORA_OPS_WEBHOOK_SECRET": secret})
    with s:
        c = MlflowClient()
        assert c.get_model_version_by_alias(name, "serving").version == str(v1)
        wait_for(lambda: "following" in s.log.read_text(), 60, s.log)
        assert "an MLflow admin creates it once" in s.log.read_text()
        body = json.dumps({"entity": "model_version_alias", "action": "created",
                           "data": {"name": name, "alias": "champion", "version": str(v1)}})
        ts = str(int(time.time()))
        for sig in ("v1,AAAA", _sign("not-the-secret", "d1", ts, body), None):  # forged, wrong secret, unsigned
            headers = {"Content-Type": "application/json", "X-MLflow-Delivery-Id": "d1", "X-MLflow-Timestamp": ts}
            if sig:
                headers["X-MLflow-Signature"] = sig
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(urllib.request.Request(hook_url, data=body.encode(), headers=headers), timeout=30)
            assert e.value.code == 401

        # /ping asked all along the move: not one refused or failed request (the front, tasks.serving.front)
        wait_for(lambda: f"serving {name} v{v1} at" in s.log.read_text(), 120, s.log)
        pings, stop_pinging = Counter(), threading.Event()

        def ping() -> None:
            while not stop_pinging.is_set():
                try:
                    with urllib.request.urlopen(f"{s.url}/ping", timeout=30) as r:
                        pings[r.status] += 1
                except OSError as e:
                    pings[type(e).__name__] += 1
                time.sleep(0.1)
        pinger = threading.Thread(target=ping, daemon=True)
        pinger.start()

        # The policy promotes a new version (register_and_promote moves `champion`): MLflow calls the receiver.
        _, v2 = register_evaluated(merged_model_dir, evaluated_merged, tmp_path, name=name)
        assert c.get_model_version_by_alias(name, "champion").version == str(v2)
        wait_for(lambda: f"serving {name} v{v2} at" in s.log.read_text(), 480, s.log)
        assert c.get_model_version_by_alias(name, "serving").version == str(v2)
        assert c.get_model_version(name, str(v2)).tags["serving_check"] == "passed"
        time.sleep(2)  # a few pings on v2, then the old server is gone
        stop_pinging.set()
        pinger.join(timeout=60)
        assert set(pings) == {200} and pings[200] > 20, pings
        assert "refused" not in s.log.read_text() and "webhook:" not in s.log.read_text(), tail(s.log)


def wait_for(cond, timeout: float, log: Path) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"not within {timeout} s:\n{tail(log)}"
        time.sleep(1)


def test_receiver_accepts_exactly_what_mlflow_signs():
    """The receiver's check against MLflow's own signer (mlflow.webhooks.delivery): the same bytes, delivery id
    and timestamp pass; any change, another secret or an old timestamp does not."""
    from mlflow.webhooks.delivery import _generate_hmac_signature

    from qlora_ops.tasks.serving.webhook import signature_error

    body, ts = '{"entity": "model_version_alias", "action": "created"}', str(int(time.time()))
    h = {"X-MLflow-Signature": _generate_hmac_signature("s3", "d-1", ts, body), "X-MLflow-Timestamp": ts,
         "X-MLflow-Delivery-Id": "d-1"}
    assert signature_error("s3", h, body.encode()) is None
    assert signature_error("s3", h, body.encode() + b" ") == "signature does not match"
    assert signature_error("other", h, body.encode()) == "signature does not match"
    assert signature_error("s3", {**h, "X-MLflow-Delivery-Id": "d-2"}, body.encode()) == "signature does not match"
    assert "replay" in signature_error("s3", h, body.encode(), now=int(ts) + 3600)
    assert signature_error("s3", {}, body.encode()).startswith("unsigned")
