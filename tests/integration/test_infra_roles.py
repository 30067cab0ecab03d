"""Least privilege of the team stack, run for real where this machine allows it.

- infra/minio-init.sh runs here under `sh`, with a stand-in for `mc` (no MinIO server or mc binary installs
  from the registries this project may use) that records each call and keeps the policy files the script
  writes. Those policies are then enforced by moto's S3 server with IAM authentication on: every request
  signed with the role's own key, each role's allowed and refused object operations tried.
  moto evaluates Action + Resource like AWS/MinIO but not the `s3:prefix` condition of ListBucket, so
  listing rights are checked on the policy documents instead.
- infra/mlflow-setup.py runs against a real `mlflow server --app-name basic-auth` with the ini that
  infra/mlflow-entrypoint.sh writes; then each role logs in and tries what it may and may not do.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, start_moto, stop_process_group, tail, wait_http

INFRA = ROOT / "infra"
BUCKET = "qlora-ops"
ROLE_KEYS = {"mlflow": "QLORA_S3_MLFLOW", "worker": "QLORA_S3_WORKER", "dropper": "QLORA_S3_DROP"}

# A stand-in for MinIO's `mc`: records argv, keeps `admin policy create` files, remembers attachments so
# `admin user info` answers like mc does ("PolicyName: a,b").
FAKE_MC = r'''#!PYTHON
import json, os, shutil, sys
state = os.environ["FAKE_MC_STATE"]
args = sys.argv[1:]
with open(os.path.join(state, "calls.jsonl"), "a") as fh:
    fh.write(json.dumps(args) + "\n")
att_path = os.path.join(state, "attached.json")
att = json.load(open(att_path)) if os.path.exists(att_path) else {}
if args[:3] == ["admin", "policy", "create"]:
    shutil.copy(args[5], os.path.join(state, args[4] + ".json"))
elif args[:3] == ["admin", "policy", "attach"]:
    user = args[args.index("--user") + 1]
    if args[4] in att.get(user, []):
        sys.exit("mc: policy already attached")
    att.setdefault(user, []).append(args[4])
elif args[:3] == ["admin", "policy", "detach"]:
    user = args[args.index("--user") + 1]
    if args[4] not in att.get(user, []):
        sys.exit("mc: policy not attached")
    att[user].remove(args[4])
elif args[:3] == ["admin", "user", "info"]:
    print("AccessKey: " + args[4] + "\nStatus: enabled\nPolicyName: " + ",".join(att.get(args[4], [])))
json.dump(att, open(att_path, "w"))
'''


def _role_env(**over) -> dict[str, str]:
    env = {"PATH": os.environ["PATH"], "MINIO_ROOT_USER": "root", "MINIO_ROOT_PASSWORD": "rootpw"}
    for role, prefix in ROLE_KEYS.items():
        env[f"{prefix}_ACCESS_KEY"], env[f"{prefix}_SECRET_KEY"] = f"{role}-key", f"{role}-secret"
    env.update(over)
    return env


def _run_minio_init(tmp_path: Path, **over) -> tuple[subprocess.CompletedProcess, Path]:
    state = tmp_path / "mc-state"
    bindir = tmp_path / "bin"
    for d in (state, bindir):
        d.mkdir(exist_ok=True)
    mc = bindir / "mc"
    mc.write_text(FAKE_MC.replace("PYTHON", sys.executable))
    mc.chmod(mc.stat().st_mode | stat.S_IEXEC)
    env = _role_env(**over)
    env.update(PATH=f"{bindir}:{env['PATH']}", FAKE_MC_STATE=str(state), QLORA_OPS_POLICY_DIR=str(tmp_path / "policies"))
    r = subprocess.run(["sh", str(INFRA / "minio-init.sh")], env=env, capture_output=True, text=True, timeout=60)
    return r, state


def _calls(state: Path) -> list[list[str]]:
    return [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]


def test_minio_init_makes_one_user_per_role_and_turns_versioning_on(tmp_path):
    r, state = _run_minio_init(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = _calls(state)
    assert ["version", "enable", f"store/{BUCKET}"] in calls
    attached = json.loads((state / "attached.json").read_text())
    assert attached == {"mlflow-key": ["qlora-ops-mlflow"], "worker-key": ["qlora-ops-worker"],
                        "dropper-key": ["qlora-ops-dropper"]}
    # Idempotent: a second run converges on the same state (mc's "already attached" is not fatal).
    r2, _ = _run_minio_init(tmp_path)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert json.loads((state / "attached.json").read_text()) == attached
    # No policy anywhere grants s3:* or the whole bucket's objects.
    for name in ("qlora-ops-mlflow", "qlora-ops-worker", "qlora-ops-dropper"):
        doc = json.loads((state / f"{name}.json").read_text())
        for s in doc["Statement"]:
            assert not any(a.endswith("*") for a in s["Action"]), (name, s)
            assert f"arn:aws:s3:::{BUCKET}/*" not in s["Resource"], (name, s)
            if "s3:ListBucket" in s["Action"]:  # bucket-level listing, limited by prefix
                assert s["Condition"]["StringLike"]["s3:prefix"], (name, s)
    dropper = json.loads((state / "qlora-ops-dropper.json").read_text())
    assert {a for s in dropper["Statement"] for a in s["Action"]} == {"s3:PutObject", "s3:AbortMultipartUpload"}
    worker = json.loads((state / "qlora-ops-worker.json").read_text())
    listed = next(s for s in worker["Statement"] if "s3:ListBucket" in s["Action"])
    assert not any(p.startswith("mlartifacts") for p in listed["Condition"]["StringLike"]["s3:prefix"])


@pytest.mark.parametrize("over, message", [
    ({"QLORA_S3_DROP_ACCESS_KEY": ""}, "QLORA_S3_DROP_ACCESS_KEY is not set"),
    ({"QLORA_S3_DROP_ACCESS_KEY": "worker-key"}, "must be three different names"),
])
def test_minio_init_refuses_a_missing_or_shared_key(tmp_path, over, message):
    r, _ = _run_minio_init(tmp_path, **over)
    assert r.returncode != 0 and message in r.stderr, r.stdout + r.stderr


def test_role_policies_enforced_by_an_s3_server(tmp_path):
    """Each role's own key against moto's S3 with IAM on: what each may do works, the rest is refused."""
    import boto3
    from botocore.exceptions import ClientError

    r, state = _run_minio_init(tmp_path)
    assert r.returncode == 0, r.stderr
    with start_moto(tmp_path) as endpoint:
        admin = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
        iam = boto3.client("iam", endpoint_url=endpoint, **admin)
        s3_admin = boto3.client("s3", endpoint_url=endpoint, **admin)
        s3_admin.create_bucket(Bucket=BUCKET)
        for key in ("mlartifacts/1/run/artifacts/model.safetensors", "dvc/files/md5/ab/cdef", "drops/week-1.jsonl"):
            s3_admin.put_object(Bucket=BUCKET, Key=key, Body=b"x")
        clients = {}
        for role in ROLE_KEYS:
            policy = (state / f"qlora-ops-{role}.json").read_text()
            iam.create_user(UserName=role)
            iam.put_user_policy(UserName=role, PolicyName=f"qlora-ops-{role}", PolicyDocument=policy)
            k = iam.create_access_key(UserName=role)["AccessKey"]
            clients[role] = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                         aws_access_key_id=k["AccessKeyId"], aws_secret_access_key=k["SecretAccessKey"])
        # From here on every request must be signed by a known key and allowed by its policy.
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                                      headers={"Content-Type": "text/plain"}))

        def allowed(role: str, op: str, key: str) -> bool:
            c = clients[role]
            try:
                if op == "get":
                    c.get_object(Bucket=BUCKET, Key=key)["Body"].read()
                elif op == "put":
                    c.put_object(Bucket=BUCKET, Key=key, Body=b"y")
                elif op == "delete":
                    c.delete_object(Bucket=BUCKET, Key=key)
                return True
            except ClientError as e:
                assert e.response["Error"]["Code"] in ("AccessDenied", "403"), e
                return False

        art, dvc, drop = "mlartifacts/1/run/artifacts/model.safetensors", "dvc/files/md5/ab/cdef", "drops/week-1.jsonl"
        expected = {
            # MLflow server: its artifact prefix only.
            ("mlflow", "get", art): True, ("mlflow", "put", "mlartifacts/1/run/artifacts/new"): True,
            ("mlflow", "delete", "mlartifacts/1/run/artifacts/new"): True,
            ("mlflow", "get", dvc): False, ("mlflow", "get", drop): False, ("mlflow", "put", "drops/evil.jsonl"): False,
            # Workers: DVC remote read/write (no delete), drops read-only, artifacts untouchable.
            ("worker", "get", dvc): True, ("worker", "put", "dvc/files/md5/cd/ef01"): True,
            ("worker", "delete", dvc): False, ("worker", "get", drop): True, ("worker", "put", "drops/x.jsonl"): False,
            ("worker", "get", art): False, ("worker", "put", "mlartifacts/1/run/artifacts/model.safetensors"): False,
            # Droppers: put under drops/ and nothing else, not even reading drops back.
            ("dropper", "put", "drops/week-2.jsonl"): True, ("dropper", "get", drop): False,
            ("dropper", "delete", drop): False, ("dropper", "put", "dvc/files/md5/00/0000"): False,
            ("dropper", "put", "mlartifacts/1/x"): False,
        }
        got = {case: allowed(*case) for case in expected}
        assert got == expected, {k: v for k, v in got.items() if v != expected[k]}


# ---------------------------------------------------------------- MLflow users and permissions
@pytest.fixture
def mlflow_auth_server(tmp_path):
    """`mlflow server --app-name basic-auth` with the ini infra/mlflow-entrypoint.sh writes (SQLite here)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_AUTH_DATABASE_URI=f"sqlite:///{tmp_path}/auth.db", MLFLOW_AUTH_CONFIG_PATH=str(tmp_path / "auth" / "basic_auth.ini"),
               MLFLOW_AUTH_ADMIN_USERNAME="admin", MLFLOW_AUTH_ADMIN_PASSWORD="admin-pw-0123456789",
               MLFLOW_FLASK_SERVER_SECRET_KEY="k" * 32,
               # Each request re-checks a PBKDF2 hash (seconds each on a loaded 2-core machine); cached
               # logins change no permission decision.
               MLFLOW_AUTH_CACHE_TTL_SECONDS="600")
    log = tmp_path / "mlflow.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(["sh", str(INFRA / "mlflow-entrypoint.sh"), sys.executable, "-m", "mlflow", "server",
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--app-name", "basic-auth",
                                 "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db", "--serve-artifacts",
                                 "--artifacts-destination", str(tmp_path / "artifacts")],
                                cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=180)
        except Exception as e:
            raise RuntimeError(f"{e}\n{tail(log)}") from None
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(proc)


def _setup_env(uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD="admin-pw-0123456789",
               MLFLOW_WORKER_USERNAME="qlora-worker", MLFLOW_WORKER_PASSWORD="worker-pw-0123456789",
               MLFLOW_TRAINER_USERNAME="qlora-trainer", MLFLOW_TRAINER_PASSWORD="trainer-pw-0123456789",
               MLFLOW_PROMOTER_USERNAME="qlora-promoter", MLFLOW_PROMOTER_PASSWORD="promoter-pw-0123456789",
               QLORA_MLFLOW_WAIT_S="60")
    return env


@pytest.mark.timeout(600)
def test_mlflow_roles_against_a_real_basic_auth_server(mlflow_auth_server, tmp_path, monkeypatch):
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client as get_app

    uri = mlflow_auth_server
    for attempt in range(2):  # the second run proves it is idempotent (users exist, grants exist)
        r = subprocess.run([sys.executable, str(INFRA / "mlflow-setup.py")], env=_setup_env(uri),
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, f"run {attempt}: {r.stdout}\n{r.stderr}"
    assert "qlora-worker: EDIT on experiment" in r.stdout and "qlora-promoter: MANAGE on registered_model" in r.stdout

    def login(user: str, password: str) -> mlflow.MlflowClient:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        return mlflow.MlflowClient(tracking_uri=uri)

    def denied(fn) -> bool:
        try:
            fn()
            return False
        except MlflowException as e:
            assert "PERMISSION_DENIED" in str(e) or "403" in str(e), e
            return True

    admin = login("admin", "admin-pw-0123456789")
    other_exp = admin.create_experiment("someone-elses")
    exp_id = admin.get_experiment_by_name("qlora-ops").experiment_id
    get_app("basic-auth", tracking_uri=uri).create_user("alice", "alice-pw-0123456789")

    # Worker: everything the flow does on its experiment and its registered model.
    worker = login("qlora-worker", "worker-pw-0123456789")
    run = worker.create_run(exp_id)
    worker.log_metric(run.info.run_id, "accuracy", 0.6)
    (tmp_path / "a.txt").write_text("artifact")
    mlflow.set_tracking_uri(uri)
    worker.log_artifact(run.info.run_id, str(tmp_path / "a.txt"))  # through the server's artifact proxy
    worker.set_terminated(run.info.run_id)
    mv = worker.create_model_version("qlora-ops-smollm2", f"runs:/{run.info.run_id}/a.txt", run_id=run.info.run_id)
    worker.set_registered_model_alias("qlora-ops-smollm2", "champion", mv.version)
    # ... and nothing beyond it.
    assert denied(lambda: worker.create_run(other_exp))
    assert denied(lambda: worker.delete_registered_model("qlora-ops-smollm2"))
    assert denied(lambda: get_app("basic-auth", tracking_uri=uri).create_user("mallory", "mallory-pw-0123456789"))
    assert denied(lambda: get_app("basic-auth", tracking_uri=uri).grant_user_permission(
        "qlora-worker", "registered_model", "qlora-ops-smollm2", "MANAGE"))

    # A person: reads everything, writes nothing.
    alice = login("alice", "alice-pw-0123456789")
    assert alice.get_model_version_by_alias("qlora-ops-smollm2", "champion").version == mv.version
    assert alice.get_metric_history(run.info.run_id, "accuracy")[0].value == 0.6
    assert denied(lambda: alice.set_registered_model_alias("qlora-ops-smollm2", "champion", mv.version))
    assert denied(lambda: alice.create_run(exp_id))

    # Promoter: moves aliases and manages the model's access, but is no admin.
    promoter = login("qlora-promoter", "promoter-pw-0123456789")
    promoter.set_registered_model_alias("qlora-ops-smollm2", "previous", mv.version)
    promoter.delete_registered_model_alias("qlora-ops-smollm2", "previous")
    assert denied(lambda: promoter.create_run(exp_id))
    assert denied(lambda: get_app("basic-auth", tracking_uri=uri).create_user("mallory", "mallory-pw-0123456789"))


@pytest.mark.timeout(600)
def test_trainer_cannot_change_what_a_version_serves_against_a_real_basic_auth_server(mlflow_auth_server, tmp_path,
                                                                                     monkeypatch):
    """Least privilege for the weights: the GPU jobs' login (trainer) logs runs, artifacts and the merged model
    in the experiment, but writes no version tag, no alias and no byte of what a version serves (the registrar's
    copy in the registry experiment); the registrar (the CPU worker) does all of that; the promoter moves
    aliases. Each role logs in to a real `mlflow server --app-name basic-auth` set up by infra/mlflow-setup.py."""
    import mlflow
    import requests
    from mlflow.exceptions import MlflowException

    uri = mlflow_auth_server
    r = subprocess.run([sys.executable, str(INFRA / "mlflow-setup.py")], env=_setup_env(uri),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert "qlora-trainer: EDIT on experiment" in r.stdout

    def login(user: str) -> mlflow.MlflowClient:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", f"{user.split('-')[1]}-pw-0123456789")
        mlflow.set_tracking_uri(uri)
        return mlflow.MlflowClient(tracking_uri=uri)

    def denied(fn) -> bool:
        try:
            fn()
            return False
        except (MlflowException, requests.HTTPError) as e:  # HTTPError: the artifact proxy's answer
            assert "PERMISSION_DENIED" in str(e) or "403" in str(e), e
            return True

    model = "qlora-ops-smollm2"
    art = tmp_path / "model-files"
    art.mkdir()
    (art / "w.bin").write_bytes(b"weights")
    worker = login("qlora-worker")
    exp_id = worker.get_experiment_by_name("qlora-ops").experiment_id
    reg_exp_id = worker.get_experiment_by_name("qlora-ops-registry").experiment_id  # registry_experiment("qlora-ops")
    run_id = worker.create_run(exp_id).info.run_id  # the parent flow's run (CPU worker)

    # Trainer (GPU jobs): its run's metrics, artifacts and the logged merged model ...
    trainer = login("qlora-trainer")
    trainer.log_metric(run_id, "train_loss", 0.5)
    trainer.log_artifact(run_id, str(art / "w.bin"), "adapters/qlora")
    trained = trainer.create_logged_model(experiment_id=exp_id, name="model", source_run_id=run_id)
    trainer.log_model_artifacts(trained.model_id, str(art))
    trainer.set_logged_model_tags(trained.model_id, {"weights_digest": "d" * 64})

    # Registrar (CPU worker): copies the model into the registry experiment and registers the copy.
    worker = login("qlora-worker")
    copy = worker.create_logged_model(experiment_id=reg_exp_id, name="model", source_run_id=run_id)
    worker.log_model_artifacts(copy.model_id, str(art))
    worker.set_logged_model_tags(copy.model_id, {"weights_digest": "d" * 64})
    mv = worker.create_model_version(model, f"models:/{copy.model_id}", run_id=run_id, model_id=copy.model_id,
                                     tags={"weights_digest": "d" * 64})
    worker.set_model_version_tag(model, mv.version, "mlmodel_digest", "e" * 64)
    worker.set_registered_model_alias(model, "champion", mv.version)

    # ... and the trainer changes nothing of it: no version tag, no alias, no version, no byte of the copy.
    trainer = login("qlora-trainer")
    assert denied(lambda: trainer.set_model_version_tag(model, mv.version, "weights_digest", "0" * 64))
    assert denied(lambda: trainer.delete_model_version_tag(model, mv.version, "weights_digest"))
    assert denied(lambda: trainer.set_registered_model_alias(model, "champion", mv.version))
    assert denied(lambda: trainer.create_model_version(model, f"models:/{trained.model_id}", run_id=run_id))
    (art / "w.bin").write_bytes(b"tampered")
    assert denied(lambda: trainer.log_model_artifacts(copy.model_id, str(art)))
    assert denied(lambda: trainer.set_logged_model_tags(copy.model_id, {"weights_digest": "0" * 64}))
    assert denied(lambda: trainer.create_logged_model(experiment_id=reg_exp_id, name="model"))
    got = mlflow.artifacts.download_artifacts(f"models:/{copy.model_id}", dst_path=str(tmp_path / "read"))
    assert (Path(got) / "w.bin").read_bytes() == b"weights"  # the trainer reads the copy, as everyone may
    assert worker.get_model_version(model, mv.version).tags["weights_digest"] == "d" * 64

    # Promoter: moves aliases (promote / rollback), writes no weights.
    promoter = login("qlora-promoter")
    promoter.set_registered_model_alias(model, "previous", mv.version)
    promoter.delete_registered_model_alias(model, "previous")
    promoter.set_model_version_tag(model, mv.version, "note", "checked by hand")  # trusted like the registrar
    assert denied(lambda: promoter.log_model_artifacts(copy.model_id, str(art)))
    assert denied(lambda: promoter.create_run(exp_id))


# ---------------------------------------------------------------- worker health (`docker compose ps`, k8s probes)
@pytest.mark.timeout(400)
def test_compose_worker_healthcheck_passes_only_for_a_polling_worker(tmp_path):
    """The worker service's own healthcheck command, run against a real `prefect worker start
    --with-healthcheck` (the compose command) on a real Prefect server: failing before the worker is up,
    passing once it polls its pool. (8080 in compose; a free port here, since the machine is shared.)"""
    import time

    import yaml

    from tests.conftest import PREFECT_CLI, start_prefect_server

    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    svc = compose["services"]["worker"]
    test_cmd = svc["healthcheck"]["test"]
    assert test_cmd[0] == "CMD" and ":8080/health" in test_cmd[-1]
    worker_cmd = svc["command"]
    assert worker_cmd[:3] == ["prefect", "worker", "start"] and "--with-healthcheck" in worker_cmd
    port = free_port()
    check = [sys.executable if a == "python" else a for a in test_cmd[1:]]
    check[-1] = check[-1].replace(":8080/", f":{port}/")

    def healthy() -> bool:
        return subprocess.run(check, capture_output=True, timeout=30).returncode == 0

    assert not healthy()  # nothing listening yet: the check can fail
    with start_prefect_server(tmp_path / "prefect") as server:
        log = tmp_path / "worker.log"
        args = [PREFECT_CLI, *worker_cmd[1:]]
        args[args.index("--pool") + 1] = "health-probe"
        with open(log, "w") as fh:
            worker = subprocess.Popen(args, cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                      env=server.client_env(PREFECT_WORKER_WEBSERVER_PORT=str(port),
                                                            PREFECT_WORKER_QUERY_SECONDS="2"))
        try:
            deadline = time.time() + 240
            while time.time() < deadline and worker.poll() is None and not healthy():
                time.sleep(2)
            assert healthy(), tail(log)
        finally:
            stop_process_group(worker)


# ---------------------------------------------------------------- the CPU worker's DVC metadata after a restart
@pytest.mark.timeout(900)
def test_a_fresh_worker_container_rebuilds_the_same_data_version(tmp_path):
    """The DVC metadata a parent run writes into its checkout (data/raw/<x>.dvc, dvc.lock, the prepare stage,
    .dvc/config.local) lives in the image's filesystem and is gone after a rebuild or a new pod. The next run
    rebuilds it from the drops and reaches the same data version: with the DVC cache volume kept (no work
    redone), and with that volume lost too."""
    from tests.data.test_versioning import drop_rows, run, workspace_with_drops, write_params

    ws, drops = workspace_with_drops(tmp_path, **{"week-01.jsonl": drop_rows(0, 60)})
    write_params(ws, "team", data={"source": str(drops), "raw": "data/raw/team", "prepared": "data/prepared/team"},
                 storage={"dvc_remote": str(tmp_path / "remote")})
    subprocess.run(["git", "add", "-A"], cwd=ws, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "team params"], cwd=ws, check=True)
    first = run(ws, "team")
    assert (ws / "data" / "raw" / "team.dvc").is_file() and (ws / "dvc.lock").is_file()

    def fresh_container(*keep: str) -> None:
        """The image again: everything the run wrote into the checkout is gone, the volumes in `keep` stay."""
        subprocess.run(["git", "checkout", "-q", "--", "."], cwd=ws, check=True)
        subprocess.run(["git", "clean", "-qfdx", *[f"--exclude={k}" for k in keep]], cwd=ws, check=True)
        assert not (ws / "dvc.lock").exists() and not (ws / "data" / "raw" / "team.dvc").exists()

    fresh_container(".dvc/cache", ".qlora-ops")  # compose volumes dvc-cache and qlora-state
    again = run(ws, "team")
    assert again["data_version"] == first["data_version"]
    assert not again["reran"]  # the run cache on the volume restored the prepared splits

    fresh_container()  # the volumes lost as well
    rebuilt = run(ws, "team")
    assert rebuilt["data_version"] == first["data_version"]
