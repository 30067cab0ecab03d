"""Static checks of the team stack (infra/, params/team.yaml): parsed, never started.

No Docker or cluster needed: these catch what a review misses and a deploy finds too late (a port open to
the network, a literal password, a variable .env.example does not mention, a GPU worker without a GPU,
a k8s script copy that drifted from its source).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

INFRA = ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
K8S = INFRA / "k8s"
GPU_POOL = "qlora-ops-gpu"
BUCKET = "qlora-ops"
# Env names that carry a credential.
SECRET_KEY = re.compile(r"PASSWORD|SECRET|AUTH_STRING|ACCESS_KEY|ROOT_USER")
# A URL with user:password@ in it.
USERINFO = re.compile(r"://[^:/@\s]+:(?P<password>[^@\s]+)@")
K8S_WORKER_SECRET_SETTING = "PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_"
REQUIRED_REF = re.compile(r"\$\{([A-Z0-9_]+):\?[^}]+\}")
ANY_REF = re.compile(r"\$\{([A-Z0-9_]+)")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _cmd(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _strings(node):
    """Every string in a parsed YAML document (so comments, which may show `${VAR:?...}` as an example, are out)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def _env_example_keys() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value
    return out


def _k8s_files() -> list[Path]:
    """Every Kubernetes manifest: infra/k8s/ (kubectl apply -k) and its optional subdirectories."""
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def _k8s_objects() -> list[dict]:
    return [o for p in _k8s_files() for o in yaml.safe_load_all(p.read_text()) if o]


def test_compose_services_and_ports(compose):
    services = compose["services"]
    assert {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "worker", "gpu-worker", "setup"} <= set(services)
    published = 0
    for name, svc in services.items():
        for port in svc.get("ports", []):
            published += 1
            # 127.0.0.1 only: an unbound "5000:5000" listens on every interface of the host.
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), (name, port)
    assert published >= 3
    assert "ports" not in services["postgres"]  # only the services reach the database


def test_compose_has_no_literal_secret(compose):
    checked = 0
    for name, svc in compose["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            value = str(value)
            # The whole credential, or the password part of a connection URL, is a ${VAR:?...} reference:
            # unset or empty in infra/.env, compose refuses to start instead of running with a blank secret.
            if SECRET_KEY.search(key):
                assert REQUIRED_REF.fullmatch(value), f"{name}.{key} = {value!r} is not a ${{VAR:?...}} reference"
                checked += 1
            if m := USERINFO.search(value):
                assert REQUIRED_REF.fullmatch(m.group("password")), f"{name}.{key} has a literal password"
                checked += 1
    assert checked >= 15
    # Nothing secret has a fallback: no `${VAR:-default}` for a credential.
    for text in _strings(compose):
        for m in re.finditer(r"\$\{([A-Z0-9_]+):-", text):
            assert not SECRET_KEY.search(m.group(1)), m.group(0)


def test_env_example_lists_every_variable_and_no_values_for_secrets(compose):
    keys = _env_example_keys()
    referenced = {v for text in _strings(compose) for v in ANY_REF.findall(text)}
    assert referenced <= set(keys), f"missing from infra/.env.example: {referenced - set(keys)}"
    for key in referenced:
        if SECRET_KEY.search(key):
            assert keys[key] == "", f"{key} has a value in .env.example; it must be left for the operator"
    text = ENV_EXAMPLE.read_text()
    assert "openssl rand" in text and "cp infra/.env.example infra/.env" in text
    # k8s reads the same keys from the per-service Secrets made of infra/.env (infra/k8s/make-secrets.sh).
    k8s_keys = set(re.findall(r"secretKeyRef: \{name: qlora-ops-[a-z0-9-]+, key: ([A-Z0-9_]+)\}",
                              " ".join(p.read_text() for p in _k8s_files())))
    tmpl = json.loads((INFRA / "prefect" / "work-pool-gpu-kubernetes.json").read_text())
    k8s_keys |= {e["valueFrom"]["secretKeyRef"]["key"]
                 for e in tmpl["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert k8s_keys and k8s_keys <= set(keys), k8s_keys - set(keys)
    secret_examples = [d for d in yaml.safe_load_all((K8S / "secret.yaml.example").read_text()) if d]
    assert {d["kind"] for d in secret_examples} == {"Secret"}
    assert {k for d in secret_examples for k in d["stringData"]} == k8s_keys
    assert all(v == "" for d in secret_examples for v in d["stringData"].values())


def test_secrets_file_is_ignored_everywhere():
    gitignore = (ROOT / ".gitignore").read_text().split()
    assert "/infra/.env" in gitignore or "infra/.env" in gitignore or ".env" in gitignore
    # The worker image copies the whole checkout: infra/.env must not end up in a layer.
    assert "**/.env" in (INFRA / "Dockerfile.dockerignore").read_text().split()


def test_mlflow_is_authenticated_and_proxies_artifacts_to_s3(compose):
    svc = compose["services"]["mlflow"]
    cmd = _cmd(svc["command"])
    assert "--app-name basic-auth" in cmd
    assert "--serve-artifacts" in cmd
    assert re.search(rf"--artifacts-destination s3://{BUCKET}/\S+", cmd), cmd
    env = svc["environment"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    # An explicit driver: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, and the image has psycopg2.
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://mlflow:${")
    assert env["MLFLOW_AUTH_DATABASE_URI"].startswith("postgresql+psycopg2://mlflow:${")
    for key in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"):
        assert REQUIRED_REF.fullmatch(env[key]), key
    dockerfile = (COMPOSE.parent / svc["build"]["context"] / svc["build"]["dockerfile"]).read_text()
    assert all(pkg in dockerfile for pkg in ("psycopg2-binary", "boto3", "Flask-WTF"))
    assert "mlflow-entrypoint.sh" in dockerfile


def test_prefect_server_requires_auth_and_clients_send_it(compose):
    services = compose["services"]
    server = services["prefect-server"]["environment"]
    assert REQUIRED_REF.fullmatch(server["PREFECT_SERVER_API_AUTH_STRING"])
    assert server["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://prefect:${")
    for name in ("worker", "gpu-worker", "setup"):
        env = services[name]["environment"]
        # Same .env variable on both sides, or the clients get 401.
        assert env["PREFECT_API_AUTH_STRING"] == server["PREFECT_SERVER_API_AUTH_STRING"], name
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert env["QLORA_OPS_HOME"] == "/app"
    for name, role in (("worker", "WORKER"), ("gpu-worker", "TRAINER")):
        env = services[name]["environment"]
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        # Never the admin: the CPU worker is the registrar (*worker* user), the GPU worker the *trainer*, who
        # writes no version tag, alias or registered bytes (infra/mlflow-setup.py).
        assert env["MLFLOW_TRACKING_USERNAME"] == f"${{MLFLOW_{role}_USERNAME:?set MLFLOW_{role}_USERNAME in infra/.env}}"
    assert "WORKDIR /app" in (INFRA / "Dockerfile").read_text()


def test_pools_and_gpu_reservation(compose):
    services = compose["services"]
    cpu, gpu = services["worker"], services["gpu-worker"]
    assert "--pool qlora-ops " in _cmd(cpu["command"]) + " "
    assert f"--pool {GPU_POOL}" in _cmd(gpu["command"])
    assert gpu["environment"]["QLORA_OPS_POOL"] == GPU_POOL
    assert gpu["environment"]["QLORA_OPS_POOL_TEMPLATE"] == "infra/prefect/work-pool-gpu.json"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    # GPU_COUNT (infra/.env, default 1): the GPUs the worker's training launches one process each on
    assert devices == [{"driver": "nvidia", "count": "${GPU_COUNT:-1}", "capabilities": ["gpu"]}]
    assert _env_example_keys()["GPU_COUNT"] == "1"
    assert "deploy" not in cpu
    assert gpu["build"]["args"]["LOCK"] == "linux-x86_64-cuda"  # the GPU lock (CUDA torch), not the CPU default
    setup = _cmd(services["setup"]["command"])
    assert "prefect work-pool create qlora-ops --type process --base-job-template infra/prefect/work-pool.json" in setup
    assert f"prefect work-pool create {GPU_POOL} --type process --base-job-template infra/prefect/work-pool-gpu.json" in setup
    assert "qlora-ops deploy --params params/team.yaml" in setup
    # Mounted scripts exist.
    for svc in services.values():
        for vol in svc.get("volumes", []):
            if vol.startswith("./"):
                assert (INFRA / vol.split(":")[0]).is_file(), vol


def test_gpu_process_pool_template_matches_cpu():
    from prefect.workers.process import ProcessWorker

    cpu = json.loads((INFRA / "prefect" / "work-pool.json").read_text())
    gpu = json.loads((INFRA / "prefect" / "work-pool-gpu.json").read_text())
    assert gpu["job_configuration"] == ProcessWorker.get_default_base_job_template()["job_configuration"]
    assert set(gpu["variables"]["properties"]) == set(cpu["variables"]["properties"])
    assert gpu["variables"]["properties"]["env"]["default"] == cpu["variables"]["properties"]["env"]["default"]
    assert gpu["variables"]["properties"]["env"]["default"]["HF_HUB_OFFLINE"] == "1"


def test_kubernetes_gpu_pool_template_requests_a_gpu():
    tmpl = json.loads((INFRA / "prefect" / "work-pool-gpu-kubernetes.json").read_text())
    jc = tmpl["job_configuration"]
    # Prefect's placeholders are kept: the worker fills command, env, image, namespace, ... per run.
    for key in ("command", "env", "labels", "name", "namespace"):
        assert jc[key] == f"{{{{ {key} }}}}", key
    manifest = jc["job_manifest"]
    assert manifest["kind"] == "Job"
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "{{ image }}" and container["args"] == "{{ command }}"
    # the Job's GPUs are the pool's `gpus` job variable (default 1): training runs one process per GPU it sees
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert any(t.get("key") == "nvidia.com/gpu" for t in pod["tolerations"])
    props = tmpl["variables"]["properties"]
    assert props["gpus"]["default"] == 1 and props["gpus"]["type"] == "integer"
    rendered = _render_gpu_job({})["spec"]["template"]["spec"]["containers"][0]
    assert rendered["resources"]["limits"]["nvidia.com/gpu"] == 1  # an integer, as Kubernetes wants it
    assert props["env"]["default"]["HF_HUB_OFFLINE"] == "1"
    assert props["namespace"]["default"] == "qlora-ops-gpu"  # sealed: only the GPU job's Secret lives there
    # The real schema of the kubernetes worker (prefect-kubernetes is in the test extra).
    from prefect_kubernetes.worker import KubernetesWorker
    default = KubernetesWorker.get_default_base_job_template()
    assert set(jc) == set(default["job_configuration"])
    assert set(props) == set(default["variables"]["properties"]) | {"gpus"}  # ours: the Job's GPU count


def test_k8s_manifests():
    objs = _k8s_objects()
    by_kind: dict[str, dict[str, dict]] = {}
    for o in objs:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    assert {"postgres", "minio", "mlflow", "prefect-server", "qlora-ops-worker", "qlora-ops-worker-gpu"} <= set(by_kind["Deployment"])
    assert "minio-init" in by_kind["Job"]
    assert "Secret" not in by_kind  # the Secret comes from infra/.env, never from a committed manifest
    for svc in by_kind["Service"].values():
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", svc["metadata"]["name"]

    def container(name):
        return by_kind["Deployment"][name]["spec"]["template"]["spec"]["containers"][0]

    gpu_pod = by_kind["Deployment"]["qlora-ops-worker-gpu"]["spec"]["template"]["spec"]
    assert container("qlora-ops-worker-gpu")["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--pool" in container("qlora-ops-worker-gpu")["args"]
    assert container("qlora-ops-worker-gpu")["args"][container("qlora-ops-worker-gpu")["args"].index("--pool") + 1] == GPU_POOL
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu_pod["tolerations"])
    assert "nvidia.com/gpu" not in (container("qlora-ops-worker").get("resources", {}).get("limits") or {})

    mlflow_args = " ".join(container("mlflow")["args"])
    assert "--app-name=basic-auth" in mlflow_args and "--serve-artifacts" in mlflow_args
    assert f"--artifacts-destination=s3://{BUCKET}/" in mlflow_args
    assert "command" not in container("mlflow")  # the image's entrypoint writes the auth config first
    server_env = {e["name"]: e for e in container("prefect-server")["env"]}
    assert server_env["PREFECT_SERVER_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"]["key"] == "PREFECT_AUTH_STRING"
    for name, role in (("qlora-ops-worker", "WORKER"), ("qlora-ops-worker-gpu", "TRAINER")):
        env = {e["name"]: e for e in container(name)["env"]}
        assert env["PREFECT_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"]["key"] == "PREFECT_AUTH_STRING"
        assert env["MLFLOW_TRACKING_USERNAME"]["valueFrom"]["secretKeyRef"]["key"] == f"MLFLOW_{role}_USERNAME"
    # Only the CPU worker (DVC remote, drops) holds an S3 key, and it is the worker's.
    cpu_env = {e["name"]: e for e in container("qlora-ops-worker")["env"]}
    assert cpu_env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["key"] == "QLORA_S3_WORKER_ACCESS_KEY"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & {e["name"] for e in container("qlora-ops-worker-gpu")["env"]}
    # No literal credential anywhere: every secret-looking env var is a secretKeyRef or built from one.
    for o in objs:
        spec = o.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            for e in c.get("env", []):
                # (the k8s worker's *_SECRET_NAME/_KEY settings name the Secret, they hold no secret)
                if SECRET_KEY.search(e["name"]) and not e["name"].startswith(K8S_WORKER_SECRET_SETTING):
                    assert "secretKeyRef" in e.get("valueFrom", {}), (o["metadata"]["name"], e)
                if m := USERINFO.search(e.get("value", "")):
                    assert re.fullmatch(r"\$\([A-Z0-9_]+\)", m.group("password")), (o["metadata"]["name"], e)


def test_k8s_init_scripts_are_copies():
    cm = next(o for o in _k8s_objects() if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "qlora-ops-init")
    assert cm["data"]["postgres-init.sh"] == (INFRA / "postgres-init.sh").read_text()
    assert cm["data"]["minio-init.sh"] == (INFRA / "minio-init.sh").read_text()
    assert cm["data"]["mlflow-setup.py"] == (INFRA / "mlflow-setup.py").read_text()


def test_team_params_validate_and_point_at_the_stack():
    from qlora_ops.tasks.core.config import load_params

    path = ROOT / "params" / "team.yaml"
    assert "qlora-ops deploy --params params/team.yaml" in "\n".join(path.read_text().splitlines()[:3])
    p = load_params(path)
    default = load_params(ROOT / "params" / "default.yaml")
    assert p.registry.tracking_uri is None  # workers take MLFLOW_TRACKING_URI
    assert p.storage.dvc_remote == f"s3://{BUCKET}/dvc"
    assert p.storage.dvc_remote_options == {"endpointurl": "http://minio:9000"}
    assert p.data.source == f"s3://{BUCKET}/drops/"
    assert p.data.source_options == {"endpoint_url": "http://minio:9000"}
    assert (p.data.raw, p.data.prepared) == ("data/raw/team", "data/prepared/team")
    assert (p.orchestration.pool, p.orchestration.gpu_pool) == ("qlora-ops", GPU_POOL)
    # Same recipe as the default: only where things live and run differs. A failure here means
    # params/default.yaml changed and params/team.yaml did not follow: copy the change over.
    team_d, default_d = p.model_dump(mode="json"), default.model_dump(mode="json")
    where = {("data", "raw"), ("data", "prepared"), ("data", "source"), ("data", "source_options"),
             ("registry", "tracking_uri"), ("storage", "dvc_remote"), ("storage", "dvc_remote_options"),
             ("orchestration", "gpu_pool")}
    for section, value in default_d.items():
        if isinstance(value, dict):
            for key in value:
                if (section, key) not in where:
                    assert team_d[section][key] == value[key], f"params/team.yaml {section}.{key} != params/default.yaml"
        else:
            assert team_d[section] == value, section
    # The bucket the params name is the one minio-init creates and MLflow writes to.
    assert 'bucket="${QLORA_OPS_BUCKET:-qlora-ops}"' in (INFRA / "minio-init.sh").read_text()


def test_docs_describe_the_stack():
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    for s in ("prefect work-pool create qlora-ops", f"--pool {GPU_POOL}", "qlora-ops deploy --params params/team.yaml",
              "s3://qlora-ops/drops/", "127.0.0.1", "infra/.env", "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_USERNAME",
              "docs/team-pipeline.md"):
        assert s in deploy, s
    arch = (ROOT / "docs" / "team-pipeline.md").read_text()
    assert arch.count("```mermaid") == 1
    for s in ("qlora-ops-gpu", "qlora-retrain", "qlora-model-stage", "MinIO", "Postgres", "dvc push", "drops"):
        assert s in arch, s


# ---------------------------------------------------------------- issue 18: least privilege, hardening, the operator's path
SERVICE_SECRETS = {  # compose service -> the infra/.env secrets it may hold, and no other
    "postgres": {"POSTGRES_PASSWORD", "PREFECT_DB_PASSWORD", "MLFLOW_DB_PASSWORD"},
    "minio": {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "QLORA_RELAY_SECRET"},  # the relay's bearer token
    "minio-init": {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "QLORA_S3_MLFLOW_ACCESS_KEY", "QLORA_S3_MLFLOW_SECRET_KEY",
                   "QLORA_S3_WORKER_ACCESS_KEY", "QLORA_S3_WORKER_SECRET_KEY", "QLORA_S3_DROP_ACCESS_KEY", "QLORA_S3_DROP_SECRET_KEY"},
    "mlflow": {"MLFLOW_DB_PASSWORD", "MLFLOW_ADMIN_USERNAME", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SECRET_KEY", "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY",
               "QLORA_S3_MLFLOW_ACCESS_KEY", "QLORA_S3_MLFLOW_SECRET_KEY"},
    "mlflow-setup": {"MLFLOW_ADMIN_USERNAME", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_WORKER_USERNAME", "MLFLOW_WORKER_PASSWORD",
                     "MLFLOW_TRAINER_USERNAME", "MLFLOW_TRAINER_PASSWORD", "MLFLOW_PROMOTER_USERNAME", "MLFLOW_PROMOTER_PASSWORD"},
    "prefect-server": {"PREFECT_DB_PASSWORD", "PREFECT_AUTH_STRING"},
    "worker": {"PREFECT_AUTH_STRING", "MLFLOW_WORKER_USERNAME", "MLFLOW_WORKER_PASSWORD", "QLORA_S3_WORKER_ACCESS_KEY",
               "QLORA_S3_WORKER_SECRET_KEY"},
    "gpu-worker": {"PREFECT_AUTH_STRING", "MLFLOW_TRAINER_USERNAME", "MLFLOW_TRAINER_PASSWORD"},  # no registrar login
    "setup": {"PREFECT_AUTH_STRING"},
    # Event-driven retraining (infra/relay/): the relay posts events with the auth string; MinIO's root
    # login subscribes drops/ to its notifications.
    "relay": {"PREFECT_AUTH_STRING", "QLORA_RELAY_SECRET"},
    "minio-events": {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"},
}
CREDENTIAL = re.compile(SECRET_KEY.pattern + "|USERNAME")  # a login name is half a credential
K8S_VERSION = "1.33.0"
# Containers allowed a writable root filesystem, and why (each carries a checkov.io/skip annotation).
WRITABLE_ROOT = {"qlora-ops-worker"}  # the parent flow writes DVC metadata into its checkout in the image


def test_each_compose_service_holds_only_its_own_secrets(compose):
    for name, svc in compose["services"].items():
        held = {v for text in _strings(svc.get("environment") or {}) for v in ANY_REF.findall(text) if CREDENTIAL.search(v)}
        assert held == SERVICE_SECRETS[name], (name, held ^ SERVICE_SECRETS[name])
    # Nobody runs as the MLflow admin or holds the dropper's key but the setup jobs.
    for name in ("worker", "gpu-worker", "setup"):
        assert not {"MLFLOW_ADMIN_PASSWORD", "QLORA_S3_DROP_SECRET_KEY", "MINIO_ROOT_PASSWORD"} & SERVICE_SECRETS[name]


def test_k8s_containers_hold_only_their_own_secrets():
    """Same matrix on Kubernetes: each container's secretKeyRefs, never the whole Secret (envFrom)."""
    expect = {"postgres": SERVICE_SECRETS["postgres"], "minio": SERVICE_SECRETS["minio"], "mc": SERVICE_SECRETS["minio-init"],
              "mlflow": SERVICE_SECRETS["mlflow"], "setup": SERVICE_SECRETS["mlflow-setup"],
              "prefect-server": SERVICE_SECRETS["prefect-server"], "relay": SERVICE_SECRETS["relay"],
              "minio-events": SERVICE_SECRETS["minio-events"]}
    for o in _k8s_objects():
        pod = o.get("spec", {}).get("template", {}).get("spec")
        if not pod:
            continue
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            keys = {e["valueFrom"]["secretKeyRef"]["key"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
            assert not any("secretRef" in f for f in c.get("envFrom", [])), (o["metadata"]["name"], c["name"])
            if o["metadata"]["name"] == "qlora-ops-worker":
                assert keys == SERVICE_SECRETS["worker"], keys
            elif o["metadata"]["name"] == "qlora-ops-worker-gpu":
                assert keys == SERVICE_SECRETS["gpu-worker"], keys
            elif o["metadata"]["name"] == "qlora-ops-k8s-worker":
                assert keys == {"PREFECT_AUTH_STRING"}, keys
            elif c["name"] == "db-upgrade":
                assert keys in ({"MLFLOW_DB_PASSWORD"}, {"PREFECT_DB_PASSWORD"}), keys
            else:
                assert keys == expect[c["name"]], (c["name"], keys)


def _pods() -> list[tuple[str, dict, dict]]:
    """(name, owner object, pod spec) of every pod template in infra/k8s, plus the GPU Job the k8s worker renders."""
    out = [(o["metadata"]["name"], o, o["spec"]["template"]["spec"]) for o in _k8s_objects()
           if o["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet")]
    job = _render_gpu_job({})
    out.append(("gpu-model-stage-job", job, job["spec"]["template"]["spec"]))
    return out


def _render_gpu_job(worker_env: dict[str, str]) -> dict:
    """.ci/render_gpu_job.py: the Job prefect-kubernetes' worker would create, from the pool template."""
    import importlib.util
    import os
    from unittest import mock

    spec = importlib.util.spec_from_file_location("render_gpu_job", ROOT / ".ci" / "render_gpu_job.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    base = {"PREFECT_API_URL": "http://prefect-server:4200/api", "PREFECT_API_AUTH_STRING": "admin:planted-secret-4711"}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    with mock.patch.dict(os.environ, {**clean, **base, **worker_env}, clear=True):
        from prefect.settings.context import get_current_settings  # noqa: F401  (settings are read per call)
        return mod.render()


def test_every_pod_is_hardened():
    """The helm chart's bar, on every pod: non-root, seccomp RuntimeDefault, no privilege escalation, no
    capabilities, read-only root (but the one listed exception), limits and requests, own ServiceAccount
    without an API token (but the worker that creates Jobs), fully qualified pinned images."""
    pods = _pods()
    assert {"postgres", "minio", "minio-init", "mlflow", "mlflow-setup", "prefect-server", "qlora-ops-worker",
            "qlora-ops-worker-gpu", "qlora-ops-k8s-worker", "gpu-model-stage-job"} <= {n for n, _, _ in pods}
    assert any(n.startswith("prefect-db-upgrade-") for n, _, _ in pods)  # the migrations Job, as in the chart
    for name, owner, pod in pods:
        sc = pod.get("securityContext", {})
        assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) > 0, name
        assert sc.get("seccompProfile") == {"type": "RuntimeDefault"}, name
        sa = pod.get("serviceAccountName")
        assert sa and sa != "default", name
        token = pod.get("automountServiceAccountToken")
        assert token is (name == "qlora-ops-k8s-worker"), (name, token)
        for c in pod["containers"] + pod.get("initContainers", []):
            csc = c.get("securityContext", {})
            assert csc.get("allowPrivilegeEscalation") is False, (name, c["name"])
            assert csc.get("capabilities") == {"drop": ["ALL"]}, (name, c["name"])
            assert csc.get("readOnlyRootFilesystem") is (name not in WRITABLE_ROOT), (name, c["name"])
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind, {})), (name, c["name"], kind)
            image = c["image"]
            registry, _, rest = image.partition("/")
            assert "." in registry and ":" in rest, f"{name}: {image} is not registry-qualified and tagged"
            assert not image.endswith(":latest"), image
        if owner["kind"] == "Deployment":
            for c in pod["containers"]:
                assert c.get("livenessProbe") and c.get("readinessProbe"), (name, c["name"])
    for name in WRITABLE_ROOT:  # the exception is declared to the scanner, with its reason
        obj = next(o for o in _k8s_objects() if o["metadata"]["name"] == name and o["kind"] == "Deployment")
        assert obj["metadata"]["annotations"]["checkov.io/skip1"].startswith("CKV_K8S_22=")
    namespaces = [o for o in _k8s_objects() if o["kind"] == "Namespace"]
    assert {ns["metadata"]["name"] for ns in namespaces} == {"qlora-ops", "qlora-ops-gpu"}  # the GPU Jobs' own
    for ns in namespaces:
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted", ns["metadata"]["name"]


def test_workers_run_their_healthcheck_and_are_probed():
    compose_doc = yaml.safe_load(COMPOSE.read_text())
    for name in ("worker", "gpu-worker"):
        svc = compose_doc["services"][name]
        assert "--with-healthcheck" in svc["command"], name
        assert "http://localhost:8080/health" in " ".join(svc["healthcheck"]["test"]), name
    for o in _k8s_objects():
        if o["kind"] == "Deployment" and "worker" in o["metadata"]["name"]:
            c = o["spec"]["template"]["spec"]["containers"][0]
            cmd = c.get("command", []) + c.get("args", [])
            assert "--with-healthcheck" in cmd, o["metadata"]["name"]
            assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "health"}
            assert {"name": "health", "containerPort": 8080} in c["ports"]


def test_network_policy_default_deny_and_labelled_flows():
    objs = _k8s_objects()
    pols = {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "NetworkPolicy"
            and o["metadata"]["namespace"] == "qlora-ops"}
    assert pols["default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    servers = {"postgres": 5432, "minio": 9000, "mlflow": 5000, "prefect-server": 4200}
    for server, port in servers.items():
        ingress = pols[server]["ingress"]
        client = {"matchLabels": {f"qlora-ops/{server.split('-')[0]}-client": "true"}}
        # Only pods of this namespace that carry the client label, no ipBlock; MLflow and the Prefect server
        # also admit the labelled pods of namespace qlora-ops-gpu (the GPU Jobs), and no other namespace.
        peers = [{"podSelector": client}]
        if server in ("mlflow", "prefect-server"):
            peers.append({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "qlora-ops-gpu"}},
                          "podSelector": client})
        assert ingress == [{"from": peers, "ports": [{"protocol": "TCP", "port": port}]}], server
    labels = {name: owner_labels for name, owner_labels in
              ((o["metadata"]["name"], o["spec"]["template"]["metadata"]["labels"]) for o in objs
               if o["kind"] in ("Deployment", "Job"))}
    need = {"mlflow": {"postgres", "minio"}, "prefect-server": {"postgres"}, "qlora-ops-worker": {"prefect", "mlflow", "minio"},
            "qlora-ops-worker-gpu": {"prefect", "mlflow"}, "minio-init": {"minio"}, "mlflow-setup": {"mlflow"},
            "qlora-ops-k8s-worker": {"prefect", "kubernetes-api"}, "postgres": set(), "minio": set()}
    for name, want in need.items():
        got = {k.split("/")[1].removesuffix("-client") for k, v in labels[name].items() if k.startswith("qlora-ops/") and v == "true"}
        assert got == want, (name, got)
    job = _render_gpu_job({})
    got = {k.split("/")[1].removesuffix("-client") for k in job["spec"]["template"]["metadata"]["labels"] if k.startswith("qlora-ops/")}
    assert got == {"prefect", "mlflow"}
    postgres_doc = (K8S / "postgres.yaml").read_text()
    assert "nothing outside the namespace's pods reaches it" not in postgres_doc and "networkpolicy.yaml" in postgres_doc


def test_k8s_manifests_validate_against_the_kubernetes_api_schema():
    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError

    objs = _k8s_objects() + [_render_gpu_job({})]
    for o in objs:
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)
    # The validator can fail: a pod-spec field in the wrong place (the GPU template once had Job fields in
    # its pod spec) and a typo are both rejected.
    bad = json.loads(json.dumps(objs[-1]))
    bad["spec"]["template"]["spec"]["completions"] = 1
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    with pytest.raises(ValidationError):
        kubernetes_validate.validate({**objs[0], "spce": {}}, K8S_VERSION, strict=True)


def test_compose_validates_against_the_compose_spec(tmp_path):
    import subprocess
    import sys

    cli = str(Path(sys.executable).parent / "check-jsonschema")
    r = subprocess.run([cli, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = yaml.safe_load(COMPOSE.read_text())
    doc["services"]["worker"]["helthcheck"] = {"test": ["CMD", "true"]}  # a typo compose would refuse
    bad = tmp_path / "compose.yml"
    bad.write_text(yaml.safe_dump(doc))
    r = subprocess.run([cli, "--builtin-schema", "vendor.compose-spec", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "helthcheck" in r.stdout + r.stderr


def test_compose_without_gpus_starts_by_default(compose):
    """No GPU worker unless COMPOSE_PROFILES=gpu is set on purpose: .env.example leaves it commented."""
    gpu_services = [n for n, s in compose["services"].items() if "deploy" in s]
    assert gpu_services == ["gpu-worker"] and compose["services"]["gpu-worker"]["profiles"] == ["gpu"]
    active = _env_example_keys()
    assert "COMPOSE_PROFILES" not in active
    assert "# COMPOSE_PROFILES=gpu" in ENV_EXAMPLE.read_text()


def test_the_docs_empty_value_check_flags_exactly_the_unfilled_values(tmp_path):
    """Run the docs' own `grep` on .env.example as copied (every secret listed) and filled (nothing)."""
    import subprocess

    deploy = (ROOT / "docs" / "deploy.md").read_text()
    m = re.search(r"^(grep [^\n#]*infra/\.env)\s", deploy, re.M)
    assert m, "docs/deploy.md has no grep check of infra/.env"
    assert m.group(1) in ENV_EXAMPLE.read_text()  # .env.example tells the same command
    work = tmp_path / "repo"
    (work / "infra").mkdir(parents=True)
    env_file = work / "infra" / ".env"
    env_file.write_text(ENV_EXAMPLE.read_text())
    r = subprocess.run(["bash", "-c", m.group(1)], cwd=work, capture_output=True, text=True)
    flagged = {line.split(":", 1)[1].split("=")[0] for line in r.stdout.splitlines()}
    assert flagged == {k for k, v in _env_example_keys().items() if v == ""} and flagged, r.stdout
    assert all(SECRET_KEY.search(k) or k.endswith("USERNAME") for k in flagged)
    env_file.write_text("".join(f"{line}0123abcd\n" if re.fullmatch(r"[A-Z0-9_]+=", line) else f"{line}\n"
                                for line in ENV_EXAMPLE.read_text().splitlines()))
    r = subprocess.run(["bash", "-c", m.group(1)], cwd=work, capture_output=True, text=True)
    assert r.stdout == "", r.stdout


def test_images_are_pinned_and_fully_qualified(compose):
    for name, svc in compose["services"].items():
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), (name, image)
        if "build" not in svc and svc.get("pull_policy") != "never":  # pulled from a registry: fully qualified
            assert image.split("/")[0] in ("docker.io", "ghcr.io", "quay.io"), (name, image)
    for dockerfile in INFRA.glob("Dockerfile*"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("FROM "):
                image = line.split()[1]
                assert image.split("/")[0] in ("docker.io", "ghcr.io") and re.search(r":v?\d", image), (dockerfile.name, image)
            if line.startswith("USER "):
                assert not line.split()[1].startswith(("0", "root")), line
        assert re.search(r"^USER \d+", dockerfile.read_text(), re.M) or dockerfile.name.endswith("dockerignore"), dockerfile.name


def test_mlflow_setup_names_the_team_params_resources(compose):
    from qlora_ops.tasks.core.config import load_params

    p = load_params(ROOT / "params" / "team.yaml")
    env = compose["services"]["mlflow-setup"]["environment"]
    assert (env["QLORA_MLFLOW_EXPERIMENT"], env["QLORA_MLFLOW_MODEL"]) == (p.registry.experiment, p.registry.model_name)
    job = next(o for o in _k8s_objects() if o["kind"] == "Job" and o["metadata"]["name"] == "mlflow-setup")
    kenv = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (kenv["QLORA_MLFLOW_EXPERIMENT"], kenv["QLORA_MLFLOW_MODEL"]) == (p.registry.experiment, p.registry.model_name)


def test_kubernetes_worker_never_puts_the_auth_string_into_a_job():
    """prefect-kubernetes' worker copies its own PREFECT_API_AUTH_STRING into every Job (and drops the
    template's Secret reference for it) unless its auth-string-secret settings are set: the k8s worker
    manifest sets them, and the Job then carries only the reference."""
    dep = next(o for o in _k8s_objects() if o["kind"] == "Deployment" and o["metadata"]["name"] == "qlora-ops-k8s-worker")
    settings = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]
                if e["name"].startswith(K8S_WORKER_SECRET_SETTING)}
    # the GPU Jobs' own Secret, in their namespace qlora-ops-gpu (infra/k8s/secret.yaml.example)
    assert settings == {K8S_WORKER_SECRET_SETTING + "NAME": "qlora-ops-gpu-job", K8S_WORKER_SECRET_SETTING + "KEY": "PREFECT_AUTH_STRING"}

    def auth_entries(job):
        return [e for e in job["spec"]["template"]["spec"]["containers"][0]["env"] if e["name"] == "PREFECT_API_AUTH_STRING"]

    without = _render_gpu_job({})  # what an unconfigured worker would create: the plain value
    assert [e.get("value") for e in auth_entries(without)] == ["admin:planted-secret-4711"]
    job = _render_gpu_job(settings)
    assert "planted-secret-4711" not in json.dumps(job)
    assert auth_entries(job) == [{"name": "PREFECT_API_AUTH_STRING",
                                  "valueFrom": {"secretKeyRef": {"name": "qlora-ops-gpu-job", "key": "PREFECT_AUTH_STRING"}}}]


def test_gpu_job_template_survives_scale_up_and_keeps_state():
    tmpl = json.loads((INFRA / "prefect" / "work-pool-gpu-kubernetes.json").read_text())
    props = tmpl["variables"]["properties"]
    # A GPU node scaled from zero plus a multi-GB image pull take many minutes; 60 s would crash the run.
    assert props["pod_watch_timeout_seconds"]["default"] >= 900
    job = _render_gpu_job({})
    pod = job["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    state = volumes[mounts["/app/.qlora-ops"]]  # checkpoints, converted base, merged model
    claim = state["persistentVolumeClaim"]["claimName"]
    # in the Jobs' namespace (a Pod mounts only claims of its own namespace)
    pvcs = {o["metadata"]["name"] for o in _k8s_objects() if o["kind"] == "PersistentVolumeClaim"
            and o["metadata"]["namespace"] == "qlora-ops-gpu"}
    assert claim in pvcs
    assert "/tmp" in mounts and pod["serviceAccountName"] == props["service_account_name"]["default"]
    # The Job's env: no S3 key (the model stage talks to MLflow only), the MLflow *trainer* user by reference
    # (never the registrar's: a training Job writes no version tag, alias or registered bytes).
    names = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert "AWS_ACCESS_KEY_ID" not in names
    assert names["MLFLOW_TRACKING_USERNAME"]["valueFrom"]["secretKeyRef"]["key"] == "MLFLOW_TRAINER_USERNAME"
    assert names["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "MLFLOW_TRAINER_PASSWORD"


def test_kustomization_lists_every_manifest_and_image():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    # No top-level namespace (it would pull qlora-ops-gpu's objects into qlora-ops): every object names its
    # own, qlora-ops or the GPU Jobs' qlora-ops-gpu (tests/code/test_k8s_secrets.py checks each one).
    assert "namespace" not in kust
    assert sorted(kust["resources"]) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    for name in kust["resources"]:
        for o in yaml.safe_load_all((K8S / name).read_text()):
            if o and o["kind"] != "Namespace":
                assert o["metadata"].get("namespace") in ("qlora-ops", "qlora-ops-gpu"), (name, o["metadata"]["name"])
    ours = {o_c["image"].rsplit(":", 1)[0] for o in _k8s_objects() if o["kind"] in ("Deployment", "Job")
            for o_c in o["spec"]["template"]["spec"]["containers"] + o["spec"]["template"]["spec"].get("initContainers", [])
            if o_c["image"].startswith("registry.example.com/")}
    assert ours == {i["name"] for i in kust["images"]}


def test_every_documented_cli_call_uses_the_venv_and_the_stack():
    """docs/deploy.md: every `prefect`/`qlora-ops` call in a shell block is the venv's (or runs inside a
    container/pod that has the stack's env), and the doc exports PREFECT_API_URL and the auth string
    before the first one; without them the CLI talks to a temporary local server."""
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", deploy, re.S)
    calls = [line for b in blocks for line in b.splitlines()
             if re.search(r"(^|[;&|(]\s*|\s--\s)(\S*/)?(prefect|qlora-ops)\s", line.strip())
             and not line.lstrip().startswith("#")]  # the command word, not a namespace or a file name
    assert len(calls) >= 8
    for line in calls:
        assert re.search(r"\.venv/bin/(prefect|qlora-ops) ", line) or re.search(r"kubectl .* exec |docker compose", line), line
    first_call = min(deploy.index(line) for line in calls if ".venv/bin/" in line)
    assert deploy.index("export PREFECT_API_URL=") < first_call
    assert deploy.index('export PREFECT_API_AUTH_STRING="$(sed') < first_call
    assert "one shared secret with no roles" in deploy
