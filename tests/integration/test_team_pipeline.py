"""The team pipeline, for real, on 127.0.0.1 only: a Prefect server, an MLflow server whose artifacts are
proxied to S3 (moto's standalone server), DVC pushing to that S3, new data dropped under an S3 prefix, and
two process workers on two pools (`cpu`, `gpu`), each in its OWN checkout, so the GPU stage can only get
the data through the artifact store. `qlora-ops deploy` creates the deployments; runs are triggered the
way the schedule would (a flow run of the deployment).

The CPU worker talks to MLflow through a proxy that answers 503 to the first model-version create: the
register stage must retry it (transient) and the run still succeed with exactly one version.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import (PREFECT_CLI, S3_ENV, FlakyProxy, make_bucket, make_workspace, start_mlflow_s3, start_moto,
                            start_prefect_server, stop_process_group, tail)

pytestmark = pytest.mark.slow
BUCKET = "qlora-ops"
LABELS = ["json", "os", "re", "math"]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def drop(endpoint: str, key: str, rows: range) -> None:
    import boto3

    body = "".join(json.dumps({"instruction": "Which module is this about?", "input": f"Item {i} talks about "
                               f"{LABELS[i % 4]} things, number {i}.", "output": LABELS[i % 4]}) + "\n" for i in rows)
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").put_object(Bucket=BUCKET, Key=key, Body=body.encode())


def team_params(model_dir: Path, s3: str, name: str = "team", **gates) -> dict:
    return {
        "model": {"source": str(model_dir), "max_seq_len": 96},
        "data": {"source": f"s3://{BUCKET}/drops/", "source_options": {"endpoint_url": s3},
                 "raw": "data/raw/team", "prepared": f"data/prepared/{name}"},
        "training": {"max_steps": 4, "batch_size": 8, "eval_every": 2, "save_every": 2, "threads": 1, "warmup_steps": 1},
        "eval": {"batch_size": 32, "max_new_tokens": 4, "max_examples": 16},
        "gates": {"min_gain_over_base": -1.0, "min_retention_vs_lora": 0.0, "max_merge_disagreement": 1.0, **gates},
        "registry": {"experiment": "team", "model_name": "team-model"},
        "storage": {"dvc_remote": f"s3://{BUCKET}/dvc", "dvc_remote_options": {"endpointurl": s3}},
        # the "GPU" worker here is a CPU process worker: CPU is intended (flows.device_check)
        "orchestration": {"pool": "cpu", "gpu_pool": "gpu", "deployment": "team", "retries": 2, "retry_delay_s": 1,
                          "gpu_required": False},
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("team")
    with start_moto(root) as s3:
        make_bucket(s3, BUCKET)
        with start_mlflow_s3(root, s3, BUCKET) as mlflow_uri, \
                start_prefect_server(root / "prefect", {"PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"}) as prefect, \
                FlakyProxy(mlflow_uri, "/model-versions/create", fail=1) as proxy:
            cpu_ws = make_workspace(root / "cpu-checkout")
            gpu_ws = make_workspace(root / "gpu-checkout")  # a second machine's checkout: shares nothing on disk
            (cpu_ws / "params" / "team.yaml").write_text(yaml.safe_dump(team_params(tiny_model_dir, s3)))
            (cpu_ws / "params" / "strict.yaml").write_text(
                yaml.safe_dump(team_params(tiny_model_dir, s3, "strict", min_gain_over_base=0.5)))
            drop(s3, "drops/week-01.jsonl", range(0, 80))
            env = prefect.client_env(**S3_ENV, PREFECT_WORKER_QUERY_SECONDS="1", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
            for pool in ("cpu", "gpu"):
                r = prefect.cli("work-pool", "create", pool, "--type", "process")
                assert r.returncode == 0, r.stdout + r.stderr
            for _ in range(2):  # deploying again updates in place: still two deployments, one schedule
                r = subprocess.run([sys.executable, "-m", "qlora_ops.flows.cli", "deploy", "--params", "params/team.yaml"],
                                   cwd=cpu_ws, env={**env, "PYTHONPATH": str(cpu_ws)}, capture_output=True, text=True,
                                   timeout=180)
                assert r.returncode == 0, r.stdout + r.stderr
            from prefect.client.orchestration import get_client
            with prefect.settings(), get_client(sync_client=True) as c:
                parent = c.read_deployment_by_name("qlora-retrain/team")
                child = c.read_deployment_by_name("qlora-model-stage/team")
                assert (parent.work_pool_name, child.work_pool_name) == ("cpu", "gpu")
                assert len(parent.schedules) == 1 and not child.schedules
                assert c.read_global_concurrency_limit_by_name("qlora-ops-registry-team-model").limit == 1
            workers = []
            for pool, ws, uri in (("cpu", cpu_ws, proxy.url), ("gpu", gpu_ws, mlflow_uri)):
                log = root / f"worker-{pool}.log"
                with open(log, "w") as fh:
                    p = subprocess.Popen([PREFECT_CLI, "worker", "start", "--pool", pool, "--type", "process",
                                          "--name", f"{pool}-worker"], cwd=root,
                                         env={**env, "QLORA_OPS_HOME": str(ws), "MLFLOW_TRACKING_URI": uri},
                                         stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
                workers.append((p, log))
            try:
                yield {"s3": s3, "mlflow": mlflow_uri, "prefect": prefect, "proxy": proxy, "cpu_ws": cpu_ws,
                       "gpu_ws": gpu_ws, "logs": [log for _, log in workers], "root": root}
            finally:
                for p, _ in workers:
                    stop_process_group(p)


def trigger(stack, params_path: str = "params/team.yaml", timeout: float = 600):
    """One run of the parent deployment, as the schedule would start it; returns (flow_run, state, seconds)."""
    from prefect.client.orchestration import get_client

    t0 = time.time()
    with stack["prefect"].settings(), get_client(sync_client=True) as c:
        dep = c.read_deployment_by_name("qlora-retrain/team")
        fr = c.create_flow_run_from_deployment(dep.id, parameters={"params_path": params_path})
        while time.time() - t0 < timeout:
            st = c.read_flow_run(fr.id).state
            if st is not None and st.type.value in TERMINAL:
                return c.read_flow_run(fr.id), st, time.time() - t0
            time.sleep(1)
    raise AssertionError(f"run {fr.id} not finished in {timeout}s\n" + diag(stack))


def diag(stack) -> str:
    return "\n".join(f"--- {log.name}:\n{tail(log, 80)}" for log in stack["logs"])


def children(stack, parent_id) -> list:
    from prefect.client.orchestration import get_client

    with stack["prefect"].settings(), get_client(sync_client=True) as c:
        runs = c.read_flow_runs()
        # run_deployment links the child through a task run in the parent; match on that.
        return [r for r in runs if r.parent_task_run_id is not None and r.id != parent_id
                and c.read_task_run(r.parent_task_run_id).flow_run_id == parent_id]


def test_team_pipeline_end_to_end(stack):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(stack["mlflow"])

    # 1. First scheduled run: retrains on the GPU pool, registers, promotes; one injected 503 is retried.
    fr, st, secs = trigger(stack)
    assert st.type.value == "COMPLETED" and st.name == "Completed", f"{st.name}: {st.message}\n{diag(stack)}"
    assert fr.work_pool_name == "cpu"
    kids = children(stack, fr.id)
    assert [k.work_pool_name for k in kids] == ["gpu"] and kids[0].state.type.value == "COMPLETED"
    assert stack["proxy"].hits == 2  # the 503'd model-version create was retried once, then went through
    versions = client.search_model_versions("name = 'team-model'")
    assert [v.version for v in versions] == ["1"]
    v1 = versions[0]
    assert not v1.source.startswith("file:") and v1.source.startswith(("models:/", "mlflow-artifacts:", "s3:")), v1.source
    run = client.get_run(v1.tags["mlflow_run_id"])
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    summary = json.loads(Path(client.download_artifacts(run.info.run_id, "model_stage.json", str(stack["root"]))).read_text())
    assert Path(summary["worker"]["workspace"]) == stack["gpu_ws"]  # trained in the GPU worker's own checkout
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapters", "eval", "data", "dvc", "model_stage.json", "gates.json"} <= arts, arts
    data_v1 = run.data.tags["qlora_ops.data_version"]
    assert v1.tags["data_version"] == data_v1 and v1.tags["fingerprint"] == run.data.tags["qlora_ops.fingerprint"]

    # The champion loads and predicts from a directory that has only the tracking URI.
    fresh = stack["root"] / "fresh"
    fresh.mkdir()
    code = ("import mlflow; m = mlflow.pyfunc.load_model('models:/team-model@champion'); "
            "print(len(m.predict(['Which module is this about?\\n\\nItem 3 talks about math things.'])))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "PREFECT_"))}
    r = subprocess.run([sys.executable, "-c", code], cwd=fresh, env={**env, "MLFLOW_TRACKING_URI": stack["mlflow"]},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "1", r.stderr[-3000:]

    # The exact data of v1 comes back from the DVC remote with the DVC files logged on its run.
    clone = stack["root"] / "data-clone"
    subprocess.run(["git", "clone", "-q", str(stack["cpu_ws"]), str(clone)], check=True)
    client.download_artifacts(run.info.run_id, "dvc", str(clone / ".dvc-logged"))
    for f in (clone / ".dvc-logged" / "dvc").rglob("*"):
        if f.is_file():
            dest = clone / f.relative_to(clone / ".dvc-logged" / "dvc")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.read_bytes())
    (clone / "params" / "team.yaml").write_text((stack["cpu_ws"] / "params" / "team.yaml").read_text())
    pull_env = {**os.environ, **S3_ENV}
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "--local", "-f", "-d", "qlora-ops", f"s3://{BUCKET}/dvc"],
                   cwd=clone, check=True, env=pull_env)
    subprocess.run([sys.executable, "-m", "dvc", "remote", "modify", "--local", "qlora-ops", "endpointurl", stack["s3"]],
                   cwd=clone, check=True, env=pull_env)
    r = subprocess.run([sys.executable, "-m", "dvc", "pull", "prepare-team"], cwd=clone, env=pull_env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (clone / "data/prepared/team/test.jsonl").read_bytes() == \
        (stack["cpu_ws"] / "data/prepared/team/test.jsonl").read_bytes()

    # 2. Nothing new: the next scheduled run ends Skipped, in seconds, and registers nothing.
    fr2, st2, secs2 = trigger(stack)
    assert st2.type.value == "COMPLETED" and st2.name == "Skipped", f"{st2.name}: {st2.message}\n{diag(stack)}"
    assert "nothing new" in st2.message and not children(stack, fr2.id)
    assert secs2 < 90, secs2  # a worker process start plus DVC checks; no training
    assert len(client.search_model_versions("name = 'team-model'")) == 1

    # 3. A new drop lands under the source prefix: the next run retrains on a new data version.
    drop(stack["s3"], "drops/week-02.jsonl", range(80, 120))
    fr3, st3, _ = trigger(stack)
    assert st3.type.value == "COMPLETED" and st3.name == "Completed", f"{st3.name}: {st3.message}\n{diag(stack)}"
    versions = {v.version: v for v in client.search_model_versions("name = 'team-model'")}
    assert set(versions) == {"1", "2"}
    assert versions["2"].tags["data_version"] != data_v1

    # 4. A planted refusal: the run ends Failed, named Rejected, with the gate table; nothing registered.
    fr4, st4, _ = trigger(stack, "params/strict.yaml")
    assert st4.type.value == "FAILED" and st4.name == "Rejected", f"{st4.name}: {st4.message}\n{diag(stack)}"
    assert "gain_over_base" in st4.message and "FAIL" in st4.message
    assert len(client.search_model_versions("name = 'team-model'")) == 2
