"""The deployment path, for real: a `prefect server` process, a process work pool built from
infra/prefect/work-pool.json, `qlora-ops deploy --params params/team.yaml` (the one way to deploy: there is
no prefect.yaml to drift from it), and a `prefect worker` process that runs a deployment from this
checkout in this venv.

No mocks. The server gets its own PREFECT_HOME and SQLite file under tmp_path, so nothing here
touches ~/.prefect or another test's server. The deployment that actually runs is a probe flow
(tests/integration/_probe_flow.py), not the retraining loop: it proves the worker resolves our code,
params and pool env the way the retraining deployment needs, in seconds instead of minutes.
The retraining deployment itself is created on the server and read back, but not run.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import PREFECT_CLI, ROOT, PrefectServer, start_prefect_server, stop_process_group, tail

QLORA_OPS_CLI = str(Path(sys.executable).parent / "qlora-ops")
WORK_POOL_JSON = ROOT / "infra" / "prefect" / "work-pool.json"
GPU_WORK_POOL_JSON = ROOT / "infra" / "prefect" / "work-pool-gpu.json"
COMPOSE = ROOT / "infra" / "docker-compose.yml"
K8S = ROOT / "infra" / "k8s"
DOCS = ROOT / "docs" / "deploy.md"
POOL = "qlora-ops"
GPU_POOL = "qlora-ops-gpu"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture
def prefect_server(tmp_path):
    home = tmp_path / "prefect-home"
    with start_prefect_server(home, {
        # The retraining deployment carries a weekly cron; with the scheduler off the server never
        # creates runs for it, so the worker below can only ever pick up the runs this test makes.
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        # A run that finds the deployment's slot taken is re-proposed after this long (default 30 s).
        "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "1",
    }) as server:
        yield server


def _deploy_probe(server: PrefectServer, name: str) -> str:
    """Deploy tests/integration/_probe_flow.py:probe from this checkout (a local-directory source)."""
    from prefect import flow
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    with server.settings():
        probe = flow.from_source(source=str(ROOT), entrypoint="tests/integration/_probe_flow.py:probe")
        # to_deployment().apply() rather than .deploy(): .deploy() first lists the pool's workers with
        # explicit null limit/offset, which a server on FastAPI >= 0.151 rejects with a 422.
        dep = probe.to_deployment(
            name=name, work_pool_name=POOL, parameters={"workspace": ".", "params_path": "params/default.yaml"},
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE))
        return str(dep.apply())


# ~45 s on 2 cores; the cap only turns a hang (a worker that never picks up) into a failure with logs.
@pytest.mark.timeout(300)
def test_worker_runs_deployment_from_local_source(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client

    from qlora_ops.tasks.core.config import load_params

    server = prefect_server
    expected_digest = load_params(ROOT / "params" / "default.yaml").digest()
    team = load_params(ROOT / "params" / "team.yaml").orchestration

    # 1. The pools, exactly as docs/deploy.md creates them (the GPU stage's deployment needs its pool to exist).
    for name, template in ((POOL, WORK_POOL_JSON), (GPU_POOL, GPU_WORK_POOL_JSON)):
        r = server.cli("work-pool", "create", name, "--type", "process", "--base-job-template", str(template))
        assert r.returncode == 0, r.stdout + r.stderr

    # 2. The retraining deployments, exactly as docs/deploy.md creates them (from the repo root). QLORA_OPS_HOME
    #    unset here, so the pull step keeps its placeholder and each worker resolves its own checkout.
    deploy_env = server.client_env()
    deploy_env.pop("QLORA_OPS_HOME", None)
    r = subprocess.run([QLORA_OPS_CLI, "deploy", "--params", "params/team.yaml"],
                       cwd=ROOT, env=deploy_env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out

    with server.settings(), get_client(sync_client=True) as client:
        pool = client.read_work_pool(POOL)
        assert pool.type == "process"
        assert pool.base_job_template["variables"]["properties"]["env"]["default"]["HF_HUB_OFFLINE"] == "1"

        dep = client.read_deployment_by_name("qlora-retrain/weekly-retrain")
        assert dep.entrypoint == "flows/retrain.py:retrain"
        assert dep.work_pool_name == POOL
        assert dep.parameters == {"params_path": "params/team.yaml", "workspace": "."}
        # Prefect 3.8 stores a deployment's limit as a global concurrency limit; `concurrency_limit` reads None.
        assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1
        assert dep.concurrency_options is not None
        assert dep.concurrency_options.collision_strategy.value == "ENQUEUE"
        assert [s.schedule.cron for s in dep.schedules] == [team.schedule] == ["0 2 * * 1"]
        assert all(s.active for s in dep.schedules)
        assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $QLORA_OPS_HOME }}"}}]

        # The GPU stage: same name (the parent looks up qlora-model-stage/<orchestration.deployment>), GPU pool, no schedule.
        stage = client.read_deployment_by_name("qlora-model-stage/weekly-retrain")
        assert stage.entrypoint == "flows/model_stage.py:model_stage"
        assert stage.work_pool_name == GPU_POOL
        assert stage.schedules == []
        assert stage.pull_steps == dep.pull_steps

    # 3. The probe deployment: same pool, same kind of limit, source = this checkout.
    probe_id = _deploy_probe(server, "probe")

    # 4. A real worker. It starts outside the checkout and without HF_* in its env, so the probe's record
    #    can only show the checkout as cwd and HF_HUB_OFFLINE=1 if the pull step and the pool's env did it.
    #    --limit 2: the worker itself would happily run both probe runs at once.
    worker_env = {k: v for k, v in server.client_env(PREFECT_WORKER_QUERY_SECONDS="1").items() if not k.startswith("HF_")}
    worker_dir = tmp_path / "worker-cwd"
    worker_dir.mkdir()
    worker_log = tmp_path / "worker.log"
    with open(worker_log, "w") as fh:
        worker = subprocess.Popen([PREFECT_CLI, "worker", "start", "--pool", POOL, "--type", "process", "--limit", "2",
                                   "--name", "probe-worker"],
                                  cwd=worker_dir, env=worker_env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        outs = [tmp_path / "out" / f"probe-{i}.json" for i in range(2)]
        with server.settings(), get_client(sync_client=True) as client:
            runs = [client.create_flow_run_from_deployment(probe_id, parameters={"out_path": str(o), "hold_seconds": 3.0})
                    for o in outs]
            deadline = time.time() + 150
            states: dict = {}
            while time.time() < deadline:
                states = {str(fr.id): client.read_flow_run(fr.id).state for fr in runs}
                if all(s is not None and s.type.value in TERMINAL for s in states.values()):
                    break
                if worker.poll() is not None:
                    break
                time.sleep(1)
            seen = {k: (s.type.value, s.name) if s else None for k, s in states.items()}
            diag = f"states={seen}\n--- worker log:\n{tail(worker_log)}\n--- server log:\n{tail(server.log, 20)}"
            assert all(s is not None and s.type.value == "COMPLETED" for s in states.values()), diag
            history = {str(fr.id): [s.name for s in client.read_flow_run_states(fr.id)] for fr in runs}
    finally:
        stop_process_group(worker)

    records = [json.loads(o.read_text()) for o in outs]
    for rec in records:
        assert rec["digest"] == expected_digest  # our params file, parsed by our tasks.core.config
        assert Path(rec["cwd"]).resolve() == ROOT.resolve()  # the pull step moved the run into the source dir
        assert Path(rec["workspace"]) == ROOT.resolve()  # so workspace="." is the checkout, as for retrain
        assert Path(rec["prefix"]).resolve() == Path(sys.prefix).resolve()  # our venv's interpreter
        assert rec["hf_hub_offline"] == "1"  # from the work pool's env defaults, not the worker's env
    assert {rec["flow_run_id"] for rec in records} == {str(fr.id) for fr in runs}

    # Deployment concurrency limit 1: the runs did not overlap, and the server is what serialized them.
    first, second = sorted(records, key=lambda rec: rec["started"])
    assert first["finished"] <= second["started"], records
    assert any("AwaitingConcurrencySlot" in names for names in history.values()), history


def test_one_way_to_deploy():
    """`qlora-ops deploy --params params/team.yaml` is the only deploy path: a second file (the old
    infra/prefect/prefect.yaml) drifted from it (default params, no registry slot, CPU pool training)."""
    assert not (ROOT / "infra" / "prefect" / "prefect.yaml").exists()
    docs = DOCS.read_text()
    assert "--prefect-file" not in docs and "prefect.yaml" not in docs
    assert "qlora-ops deploy --params params/team.yaml" in docs
    compose = yaml.safe_load(COMPOSE.read_text())
    assert "qlora-ops deploy --params params/team.yaml" in " ".join(map(str, _as_list(compose["services"]["setup"]["command"])))


def _as_list(cmd) -> list:
    return cmd if isinstance(cmd, list) else [cmd]


def test_work_pool_template_and_manifests_parse():
    """work-pool.json is the real process template plus env defaults; compose and k8s manifests parse."""
    from prefect.workers.process import ProcessWorker

    default = ProcessWorker.get_default_base_job_template()
    for path in (WORK_POOL_JSON, GPU_WORK_POOL_JSON):
        tmpl = json.loads(path.read_text())
        assert tmpl["job_configuration"] == default["job_configuration"]
        assert set(tmpl["variables"]["properties"]) == set(default["variables"]["properties"])
        env_default = tmpl["variables"]["properties"]["env"]["default"]
        assert env_default["HF_HUB_OFFLINE"] == "1" and env_default["HF_DATASETS_OFFLINE"] == "1"
        assert all(isinstance(v, str) for v in env_default.values())

    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"prefect-server", "mlflow", "worker", "gpu-worker", "postgres", "minio"} <= set(services)
    worker = services["worker"]
    dockerfile = (COMPOSE.parent / worker["build"]["context"] / worker["build"]["dockerfile"]).resolve()
    assert dockerfile == (ROOT / "infra" / "Dockerfile").resolve() and dockerfile.is_file()
    env = worker["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    mlflow_cmd = " ".join(map(str, _as_list(services["mlflow"]["command"])))
    assert "--serve-artifacts" in mlflow_cmd and "--artifacts-destination" in mlflow_cmd

    kinds: dict[str, list[str]] = {}
    gpu_limits = []
    for p in sorted(K8S.glob("*.yaml")):
        if p.name == "kustomization.yaml":  # kustomize's own file, not a Kubernetes object
            continue
        for obj in yaml.safe_load_all(p.read_text()):
            if not obj:
                continue
            kinds.setdefault(obj["kind"], []).append(obj["metadata"]["name"])
            if obj["kind"] == "Deployment":
                for c in obj["spec"]["template"]["spec"]["containers"]:
                    lim = (c.get("resources") or {}).get("limits") or {}
                    if "nvidia.com/gpu" in lim:
                        gpu_limits.append(lim["nvidia.com/gpu"])
    assert {"Deployment", "Service", "PersistentVolumeClaim", "ConfigMap"} <= set(kinds), kinds
    assert {"prefect-server", "mlflow", "postgres", "minio"} <= set(kinds["Service"])
    assert gpu_limits == [1]
