"""Retrain when data lands, for real, on 127.0.0.1: a Prefect server with API auth and its automations
service, a process worker, `qlora-ops deploy` installing the drop trigger on two retraining deployments
(a directory source and an S3 source), the relay (`python -m qlora_ops.flows.relay`), and moto's S3 with IAM
enforced, so the dropper's key can only put under drops/.

- directory source: `qlora-ops drop` copies the file in and sends the event itself; a run starts and
  registers.
- S3 source: `qlora-ops drop` refuses a bad file (file:line) and uploads a good one with the put-only
  key; moto sends no bucket notifications, so the test POSTs to the relay exactly what MinIO's webhook
  target would for that object; a run starts and registers. The same file dropped again, announced by
  two notifications 1 s apart, gives one run, started debounce_s after the second, and it ends Skipped.
- No run starts without an event: each deployment ends with exactly the runs its drops explain.

Runs use the tiny random Llama and a handful of steps; debounce_s is Prefect's minimum (10 s).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from tests.conftest import (PREFECT_CLI, free_port, make_workspace, start_moto, start_prefect_server,
                            stop_process_group, tail, wait_http)

pytestmark = pytest.mark.slow
AUTH = "admin:drop-test-secret"
TOKEN = "minio-relay-token"
BUCKET = "qlora-ops"
DEBOUNCE = 10  # Prefect's minimum `within` for a Proactive trigger
LABELS = ["json", "os", "re", "math"]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# From the event to the run: debounce + the server's 5 s proactive evaluation tick + the automation's
# action + the worker's poll. The bound; measured ~15-20 s (see the report in the test output).
START_WITHIN = 30


def rows(start: int, n: int) -> str:
    return "".join(json.dumps({"instruction": "Which module is this about?",
                               "input": f"Item {i} talks about {LABELS[i % 4]} things, number {i}.",
                               "output": LABELS[i % 4]}) + "\n" for i in range(start, start + n))


def params(model_dir: Path, mlflow_uri: str, name: str, data: dict) -> dict:
    return {
        "model": {"source": str(model_dir), "max_seq_len": 96},
        "data": {**data, "raw": f"data/raw/{name}", "prepared": f"data/prepared/{name}"},
        "training": {"max_steps": 2, "batch_size": 8, "eval_every": 2, "save_every": 2, "threads": 1, "warmup_steps": 1},
        "eval": {"batch_size": 16, "max_new_tokens": 4, "max_examples": 8},
        "gates": {"min_gain_over_base": -1.0, "min_retention_vs_lora": 0.0, "max_merge_disagreement": 1.0},
        "registry": {"tracking_uri": mlflow_uri, "experiment": f"drop-{name}", "model_name": f"drop-{name}"},
        "orchestration": {"pool": "cpu", "deployment": name, "schedule": "0 2 * * 1", "debounce_s": DEBOUNCE,
                          "retries": 1, "retry_delay_s": 1},
    }


def s3_client(endpoint: str, service: str = "s3", key: tuple[str, str] = ("testing", "testing")):
    import boto3

    return boto3.client(service, endpoint_url=endpoint, aws_access_key_id=key[0], aws_secret_access_key=key[1],
                        region_name="us-east-1")


def iam_user(endpoint: str, name: str, statement: dict) -> tuple[str, str]:
    iam = s3_client(endpoint, "iam")
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName=name,
                        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [statement]}))
    k = iam.create_access_key(UserName=name)["AccessKey"]
    return k["AccessKeyId"], k["SecretAccessKey"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir, mlflow_server):
    root = tmp_path_factory.mktemp("drops")
    with start_moto(root) as s3:
        s3_client(s3).create_bucket(Bucket=BUCKET)
        # The least-privilege split of the team stack: droppers put under drops/ only; workers read it.
        dropper = iam_user(s3, "dropper", {"Effect": "Allow", "Action": "s3:PutObject",
                                           "Resource": f"arn:aws:s3:::{BUCKET}/drops/*"})
        worker_key = iam_user(s3, "worker", {"Effect": "Allow", "Action": "s3:*",
                                             "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"]})
        # From here on moto checks every request's signature and IAM policy.
        urllib.request.urlopen(urllib.request.Request(f"{s3}/moto-api/reset-auth", data=b"0", method="POST",
                                                      headers={"Content-Type": "text/plain"}), timeout=10)
        with start_prefect_server(root / "prefect", {"PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
                                                     "PREFECT_SERVER_API_AUTH_STRING": AUTH}, timeout=300) as prefect:
            ws = make_workspace(root / "checkout")
            dropbox = root / "dropbox"
            for name, data in (("dir", {"source": str(dropbox)}),
                               ("s3", {"source": f"s3://{BUCKET}/drops/", "source_options": {"endpoint_url": s3}})):
                (ws / "params" / f"{name}.yaml").write_text(yaml.safe_dump(params(tiny_model_dir, mlflow_server, name, data)))
            env = {k: v for k, v in prefect.client_env(PREFECT_API_AUTH_STRING=AUTH).items() if not k.startswith("AWS_")}
            env["PYTHONPATH"] = str(ws)
            r = prefect.cli("work-pool", "create", "cpu", "--type", "process", PREFECT_API_AUTH_STRING=AUTH)
            assert r.returncode == 0, r.stdout + r.stderr
            for name in ("dir", "s3"):
                r = subprocess.run([sys.executable, "-m", "qlora_ops.flows.cli", "deploy", "--params", f"params/{name}.yaml"],
                                   cwd=ws, env=env, capture_output=True, text=True, timeout=300)
                assert r.returncode == 0 and "drop trigger: " in r.stdout, r.stdout + r.stderr
            relay_port = free_port()
            procs = []
            with open(root / "relay.log", "w") as fh:
                procs.append(subprocess.Popen([sys.executable, "-m", "qlora_ops.flows.relay", "--port", str(relay_port)], cwd=ws,
                                              env={**env, "QLORA_RELAY_SECRET": TOKEN}, stdout=fh, stderr=subprocess.STDOUT,
                                              start_new_session=True))
            wait_http(f"http://127.0.0.1:{relay_port}/healthz", procs[0], timeout=120)
            with open(root / "worker.log", "w") as fh:
                procs.append(subprocess.Popen(
                    [PREFECT_CLI, "worker", "start", "--pool", "cpu", "--type", "process", "--name", "cpu-worker"],
                    cwd=root, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                    env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1", "QLORA_OPS_HOME": str(ws), "AWS_ACCESS_KEY_ID":
                         worker_key[0], "AWS_SECRET_ACCESS_KEY": worker_key[1], "AWS_DEFAULT_REGION": "us-east-1"}))
            try:
                yield {"root": root, "ws": ws, "s3": s3, "dropbox": dropbox, "prefect": prefect, "env": env,
                       "dropper": dropper, "worker_key": worker_key, "relay": f"http://127.0.0.1:{relay_port}/minio",
                       "mlflow": mlflow_server, "logs": [root / "relay.log", root / "worker.log"],
                       "events": {"dir": [], "s3": []}}
            finally:
                for p in procs:
                    stop_process_group(p)


@contextmanager
def client(stack):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, PREFECT_HOME, temporary_settings

    p = stack["prefect"]
    with temporary_settings(updates={PREFECT_API_URL: p.api, PREFECT_HOME: str(p.home), PREFECT_API_AUTH_STRING: AUTH}), \
            get_client(sync_client=True) as c:
        yield c


def runs_of(stack, name: str) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with client(stack) as c:
        dep = c.read_deployment_by_name(f"qlora-retrain/{name}")
        return c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))


def diag(stack) -> str:
    return "\n".join(f"--- {log.name}:\n{tail(log, 60)}" for log in stack["logs"]) + \
        f"\n--- prefect server:\n{tail(stack['prefect'].log, 30)}"


def next_run(stack, name: str, after: int, t_event: float, timeout: float = 900):
    """Wait for the deployment's run number `after`+1 to appear and end; (run, seconds from the event to
    its creation, seconds from the event to Running)."""
    deadline = t_event + timeout
    created = running = None
    while time.time() < deadline:
        runs = sorted(runs_of(stack, name), key=lambda r: r.created)
        if len(runs) > after:
            fr = runs[after]
            created = created or time.time() - t_event
            if running is None and fr.start_time is not None:
                running = fr.start_time.timestamp() - t_event
            if fr.state is not None and fr.state.type.value in TERMINAL:
                return fr, created, running
        time.sleep(0.5)
    raise AssertionError(f"no finished run #{after + 1} of qlora-retrain/{name} within {timeout}s\n{diag(stack)}")


def cli_drop(stack, file: Path, name: str, prefect: bool = True, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in stack["env"].items() if prefect or k not in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING")}
    return subprocess.run([sys.executable, "-m", "qlora_ops.flows.cli", "drop", str(file), "--params", f"params/{name}.yaml"],
                          cwd=stack["ws"], env={**base, **env}, capture_output=True, text=True, timeout=300)


def registered(stack, name: str) -> list[str]:
    from mlflow.tracking import MlflowClient

    return sorted(v.version for v in MlflowClient(stack["mlflow"]).search_model_versions(f"name = 'drop-{name}'"))


def minio_notification(stack, key: str, sequencer: str) -> dict:
    """The body MinIO's webhook target POSTs for a PutObject of `key` (event.Log with one S3 record),
    filled from the real object."""
    head = s3_client(stack["s3"], key=stack["worker_key"]).head_object(Bucket=BUCKET, Key=key)
    from urllib.parse import quote_plus
    return {"EventName": "s3:ObjectCreated:Put", "Key": f"{BUCKET}/{key}", "Records": [{
        "eventVersion": "2.0", "eventSource": "minio:s3", "awsRegion": "",
        "eventTime": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
        "eventName": "s3:ObjectCreated:Put", "userIdentity": {"principalId": stack["dropper"][0]},
        "requestParameters": {"principalId": stack["dropper"][0], "region": "", "sourceIPAddress": "127.0.0.1"},
        "responseElements": {"x-amz-request-id": sequencer, "x-minio-origin-endpoint": stack["s3"]},
        "s3": {"s3SchemaVersion": "1.0", "configurationId": "Config",
               "bucket": {"name": BUCKET, "ownerIdentity": {"principalId": stack["dropper"][0]},
                          "arn": f"arn:aws:s3:::{BUCKET}"},
               "object": {"key": quote_plus(key), "size": head["ContentLength"], "eTag": head["ETag"].strip('"'),
                          "contentType": "application/octet-stream", "sequencer": sequencer}},
        "source": {"host": "127.0.0.1", "port": "", "userAgent": "aiobotocore"}}]}


def post_relay(stack, body: dict, token: str = TOKEN) -> int:
    req = urllib.request.Request(stack["relay"], data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.timeout(1500)
def test_directory_drop_sends_its_event_and_a_run_registers(stack):
    week1 = stack["root"] / "week-01.jsonl"
    week1.write_text(rows(0, 80))

    r = cli_drop(stack, week1, "dir")
    t_event = time.time()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "event qlora-ops.data.dropped sent" in r.stdout, r.stdout
    assert (stack["dropbox"] / "week-01.jsonl").read_bytes() == week1.read_bytes()
    fr, created, running = next_run(stack, "dir", 0, t_event)
    print(f"directory drop: run created {created:.1f} s, Running {running:.1f} s after the event")
    assert fr.state.name == "Completed", f"{fr.state.name}: {fr.state.message}\n{diag(stack)}"
    assert created <= START_WITHIN, created
    assert registered(stack, "dir") == ["1"]


@pytest.mark.timeout(1500)
def test_s3_drop_with_a_put_only_key_reaches_prefect_through_the_relay(stack):
    from botocore.exceptions import ClientError

    week1 = stack["root"] / "s3-week-01.jsonl"
    week1.write_text(rows(100, 80))
    bad = stack["root"] / "s3-week-02.jsonl"
    bad.write_text(rows(200, 3) + '{"instruction": "Which module?", "input": "x"}\n')
    dropper = {"AWS_ACCESS_KEY_ID": stack["dropper"][0], "AWS_SECRET_ACCESS_KEY": stack["dropper"][1],
               "AWS_DEFAULT_REGION": "us-east-1"}
    # The dropper holds no Prefect secret: neither the API URL nor the auth string.
    no_prefect = {"prefect": False}

    # A bad file is refused naming file:line; nothing is uploaded.
    r = cli_drop(stack, bad, "s3", **dropper, **no_prefect)
    assert r.returncode == 2 and f"{bad}:4: missing \"output\"" in r.stderr, r.stdout + r.stderr
    r = cli_drop(stack, week1, "s3", **dropper, **no_prefect)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "through the relay" in r.stdout
    worker_s3 = s3_client(stack["s3"], key=stack["worker_key"])
    keys = [o["Key"] for o in worker_s3.list_objects_v2(Bucket=BUCKET, Prefix="drops/").get("Contents", [])]
    assert keys == ["drops/s3-week-01.jsonl"]
    # The key that dropped it can do nothing else: not list, not read, not write outside drops/.
    as_dropper = s3_client(stack["s3"], key=stack["dropper"])
    for call in (lambda: as_dropper.list_objects_v2(Bucket=BUCKET, Prefix="drops/"),
                 lambda: as_dropper.get_object(Bucket=BUCKET, Key="drops/s3-week-01.jsonl"),
                 lambda: as_dropper.put_object(Bucket=BUCKET, Key="dvc/planted", Body=b"x")):
        with pytest.raises(ClientError, match="AccessDenied|Forbidden|403"):
            call()

    # MinIO's notification for that PutObject, as its webhook target sends it: a wrong token is refused.
    note = minio_notification(stack, "drops/s3-week-01.jsonl", "17A0000000000001")
    assert post_relay(stack, note, token="not-the-token") == 401
    assert not runs_of(stack, "s3")
    assert post_relay(stack, note) == 204
    t_event = time.time()
    fr, created, running = next_run(stack, "s3", 0, t_event)
    print(f"relayed S3 drop: run created {created:.1f} s, Running {running:.1f} s after the event")
    assert fr.state.name == "Completed", f"{fr.state.name}: {fr.state.message}\n{diag(stack)}"
    assert created <= START_WITHIN, created
    assert registered(stack, "s3") == ["1"]

    # Two uploads of the same file 1 s apart: two notifications, one run, and it finds nothing new.
    r = cli_drop(stack, week1, "s3", **dropper, **no_prefect)
    assert r.returncode == 0, r.stdout + r.stderr
    assert post_relay(stack, minio_notification(stack, "drops/s3-week-01.jsonl", "17A0000000000002")) == 204
    time.sleep(1)
    assert post_relay(stack, minio_notification(stack, "drops/s3-week-01.jsonl", "17A0000000000003")) == 204
    t_event = time.time()
    fr, created, _ = next_run(stack, "s3", 1, t_event)
    assert fr.state.name == "Skipped", f"{fr.state.name}: {fr.state.message}\n{diag(stack)}"
    # Trailing edge: the run waits debounce_s after the LAST drop (a trigger firing on the first would
    # have started it about a second before the second notification, and missed a later file).
    assert DEBOUNCE - 2 <= created <= START_WITHIN, created
    # Long enough for a second run to show if either notification had fired on its own.
    time.sleep(max(0.0, t_event + 2 * DEBOUNCE + 10 - time.time()))
    assert len(runs_of(stack, "s3")) == 2, diag(stack)
    assert registered(stack, "s3") == ["1"]
    # Meanwhile (minutes without a drop there) the directory deployment started nothing on its own.
    assert len(runs_of(stack, "dir")) == 1
