"""One registry writer everywhere, and who it was (issues 17 and 18), on real servers: an `mlflow server
--app-name basic-auth` (users, passwords, a per-model MANAGE grant) and a `prefect server`.

- Against a shared (http) tracking server, `promote`, `rollback` and `run` without the team's Prefect API
  are refused before any write (exit 4, saying how to point at it); with it, writers take turns on the
  model's one slot; a Prefect API whose slot is not the one the model's writers recorded is refused.
- `promote` (forced or not) and `rollback` record the user the tracking server authenticated, whatever
  $USER says; a local store records the OS user, said to be unauthenticated.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, free_port, start_prefect_server, stop_process_group, tail, wait_http

pytestmark = pytest.mark.slow
ADMIN = ("admin", "Admin-pass-1234")
ALICE = ("alice", "Alice-pass-5678")  # a promoter: MANAGE on the registered model only


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """`mlflow server --app-name basic-auth` on 127.0.0.1 with its own user database; yields its URI."""
    d = tmp_path_factory.mktemp("mlflow-auth")
    (d / "auth.ini").write_text("[mlflow]\ndefault_permission = READ\n"
                                f"database_uri = sqlite:///{d}/auth.db\nadmin_username = {ADMIN[0]}\n"
                                f"admin_password = {ADMIN[1]}\n"
                                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(d / "auth.ini"), MLFLOW_FLASK_SERVER_SECRET_KEY="test-only-secret")
    with open(d / "server.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host",
                                 "127.0.0.1", "--port", str(port), "--backend-store-uri", f"sqlite:///{d}/mlflow.db",
                                 "--artifacts-destination", str(d / "artifacts"), "--workers", "1"],
                                stdout=log, stderr=subprocess.STDOUT, cwd=d, env=env, start_new_session=True)
    try:
        try:
            wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=240)
        except Exception as e:
            raise RuntimeError(f"{e}\n{tail(d / 'server.log')}") from None
        uri = f"http://127.0.0.1:{port}"
        with creds(*ADMIN):
            from mlflow.server import get_app_client

            get_app_client("basic-auth", tracking_uri=uri).create_user(*ALICE)
        yield uri
    finally:
        stop_process_group(proc)


class creds:
    """MLflow basic-auth credentials in this process's environment (restored on exit)."""

    def __init__(self, user: str, password: str):
        self.new = {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}

    def __enter__(self):
        self.old = {k: os.environ.get(k) for k in self.new}
        os.environ.update(self.new)

    def __exit__(self, *exc):
        for k, v in self.old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def prefect(tmp_path_factory):
    with start_prefect_server(tmp_path_factory.mktemp("prefect") / "home") as server:
        yield server


def make_model(uri: str, name: str, versions: int = 2, champion: int | None = 1, grant: bool = True) -> None:
    """`versions` complete (status ready) versions of `name`, made by the admin; `champion` holds the alias."""
    from mlflow import MlflowClient

    with creds(*ADMIN):
        c = MlflowClient(uri)
        c.create_registered_model(name)
        run = c.create_run(c.create_experiment(f"exp-{name}"))
        for _ in range(versions):
            c.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                   tags={"status": "ready"})
        if champion:
            c.set_registered_model_alias(name, "champion", str(champion))
        if grant:
            from mlflow.server import get_app_client

            get_app_client("basic-auth", tracking_uri=uri).grant_user_permission(ALICE[0], "registered_model", name,
                                                                                "MANAGE")


def workspace(tmp: Path, uri: str, name: str, **extra) -> Path:
    ws = tmp / f"ws-{name}"
    (ws / "params").mkdir(parents=True)
    p = {"registry": {"tracking_uri": uri, "experiment": f"exp-{name}", "model_name": name},
         "orchestration": {"timeouts": {"registry": 120}}, **extra}
    (ws / "params" / "w.yaml").write_text(yaml.safe_dump(p))
    return ws


def env(user: tuple[str, str] = ALICE, prefect=None, **extra) -> dict[str, str]:
    """A fresh CLI environment: this checkout's code, the given MLflow user, $USER spoofed, and this test's
    Prefect API only when `prefect` is given."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "QLORA_OPS_"))}
    if prefect is not None:
        e = {**prefect.client_env(), **{k: v for k, v in e.items() if k != "PYTHONPATH"}}
    e.update(PYTHONPATH=str(ROOT), MLFLOW_TRACKING_USERNAME=user[0], MLFLOW_TRACKING_PASSWORD=user[1],
             USER="mallory", LOGNAME="mallory", PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)
    return e


def cli(ws: Path, e: dict, *args: str, popen: bool = False):
    cmd = [sys.executable, "-m", "qlora_ops.flows.cli", *args, "--params", "params/w.yaml", "--workspace", str(ws)]
    if popen:
        return subprocess.Popen(cmd, cwd=ws, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ws, env=e, capture_output=True, text=True, timeout=300)


def aliases(uri: str, name: str) -> dict:
    from mlflow import MlflowClient

    with creds(*ADMIN):
        return dict(MlflowClient(uri).get_registered_model(name).aliases)


def vtags(uri: str, name: str, v: int) -> dict:
    from mlflow import MlflowClient

    with creds(*ADMIN):
        return dict(MlflowClient(uri).get_model_version(name, str(v)).tags)


def test_shared_registry_writes_without_the_team_prefect_api_are_refused(auth_server, tmp_path):
    from mlflow import MlflowClient

    name = "nolock"
    make_model(auth_server, name)
    ws = workspace(tmp_path, auth_server, name, data={"raw": "data/raw/missing.jsonl"})
    # verify-serving and serve --follow move `serving`: refused up front too (issue 25), before any endpoint check
    for args in (["promote", "2", "--force", "--reason", "laptop"], ["rollback", "--reason", "laptop"], ["run"],
                 ["verify-serving", "http://127.0.0.1:9", "--version", "1"], ["serve", "--follow", "--port", "9"]):
        r = cli(ws, env(), *args)
        assert r.returncode == 4, (args, r.stdout, r.stderr)
        assert "without its lock" in r.stderr and "export PREFECT_API_URL" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert aliases(auth_server, name) == {"champion": "1"}
    assert "promoted_by" not in vtags(auth_server, name, 2)
    with creds(*ADMIN):  # `run` stopped before any work: no MLflow run in its experiment
        exp = MlflowClient(auth_server).get_experiment_by_name(f"exp-{name}")
        assert len(MlflowClient(auth_server).search_runs([exp.experiment_id])) == 1  # make_model's own


def test_writers_on_the_team_api_take_turns_and_another_api_is_refused(auth_server, prefect, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client

    from qlora_ops.flows.registry_slot import LOCK_TAG, registry_limit_name, registry_writer

    name = "turns"
    make_model(auth_server, name)
    ws = workspace(tmp_path, auth_server, name, data={"raw": "data/raw/missing.jsonl"})
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ALICE[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ALICE[1])
    import mlflow

    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", auth_server)  # restored after
    with prefect.settings():
        with registry_writer(auth_server, name, timeout_s=60):  # a worker's register + promote in flight
            p = cli(ws, env(prefect=prefect), "promote", "2", "--force", "--reason", "hotfix", popen=True)
            out, t0 = "", time.time()
            while "waiting for the registry slot" not in out:
                line = p.stdout.readline()
                assert line or p.poll() is None, out
                out += line
                assert time.time() - t0 < 180, out
            time.sleep(2)
            assert p.poll() is None and aliases(auth_server, name) == {"champion": "1"}, out
            released = time.time()
        rest, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out + rest
        assert time.time() >= released and aliases(auth_server, name) == {"champion": "2"}
        with get_client(sync_client=True) as c:  # the first writer recorded which slot every writer must take
            limit = c.read_global_concurrency_limit_by_name(registry_limit_name(name))
            from mlflow import MlflowClient

            assert MlflowClient(auth_server).get_registered_model(name).tags[LOCK_TAG] == str(limit.id)
            # Another Prefect API (a laptop's own `prefect server start`, or a rebuilt one) has another slot:
            c.delete_global_concurrency_limit_by_name(limit.name)
    for args in (["rollback", "--reason", "from another Prefect API"], ["run"]):  # `run`: before any work (no data)
        r = cli(ws, env(prefect=prefect), *args)
        assert r.returncode == 4 and LOCK_TAG in r.stderr and "export PREFECT_API_URL" in r.stderr, r.stdout + r.stderr
    assert aliases(auth_server, name) == {"champion": "2"}


def test_promote_and_rollback_record_the_user_the_server_authenticated(auth_server, prefect, tmp_path):
    name = "who"
    make_model(auth_server, name, versions=2, champion=None)
    ws = workspace(tmp_path, auth_server, name)
    e = env(prefect=prefect)  # alice's credentials; $USER says mallory

    r = cli(ws, e, "promote", "1")  # unforced: the first champion
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli(ws, e, "promote", "2", "--force", "--reason", "canary looked fine")
    assert r.returncode == 0 and "done by alice" in r.stdout, r.stdout + r.stderr
    r = cli(ws, e, "rollback", "--reason", "bad answers")
    assert r.returncode == 0 and "done by alice" in r.stdout, r.stdout + r.stderr

    v1, v2 = vtags(auth_server, name, 1), vtags(auth_server, name, 2)
    assert v1["promoted_by"] == "alice" and v1["promoted_by_auth"].startswith("authenticated by the tracking server")
    assert v2["promoted_by"] == v2["forced_promotion_by"] == v2["rolled_back_by"] == "alice"
    assert v2["rolled_back_by_auth"].startswith("authenticated") and v2["rejected_reason"].startswith("rolled back by alice")
    assert "mallory" not in " ".join(v1.values()) + " ".join(v2.values())
    assert aliases(auth_server, name) == {"champion": "1"}

    bad = cli(ws, env(user=("alice", "wrong-password"), prefect=prefect), "promote", "2", "--force", "--reason", "x")
    assert bad.returncode != 0 and "MLFLOW_TRACKING_PASSWORD" in bad.stderr, bad.stdout + bad.stderr
    assert aliases(auth_server, name) == {"champion": "1"}


def test_a_local_store_records_the_os_user_as_unauthenticated(tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from qlora_ops.tasks.registry import manual as registry_ops
    from qlora_ops.tasks.gates.policy import PromotionPolicy

    uri = f"sqlite:///{tmp_path}/m.db"
    monkeypatch.setenv("USER", "bob")
    monkeypatch.setenv("LOGNAME", "bob")
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", uri)  # restored after the test
    c = MlflowClient(uri)
    run = c.create_run(c.create_experiment("e", artifact_location=(tmp_path / "a").as_uri()))
    c.create_registered_model("m")
    for _ in range(2):
        c.create_model_version("m", f"{run.info.artifact_uri}/model", run.info.run_id, tags={"status": "ready"})
    pol = PromotionPolicy()
    assert registry_ops.promote("m", 1, "champion", pol, tmp_path / "w")["promoted"]  # unforced: first champion
    registry_ops.promote("m", 2, "champion", pol, tmp_path / "w", force=True, reason="r")
    registry_ops.rollback("m", "champion", reason="r")
    v1, v2 = c.get_model_version("m", "1").tags, c.get_model_version("m", "2").tags
    assert v1["promoted_by"] == v2["rolled_back_by"] == "bob"
    assert v1["promoted_by_auth"] == v2["rolled_back_by_auth"] == "unauthenticated: OS user of a local store (sqlite)"
