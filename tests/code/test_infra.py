"""Static checks of the team stack (infra/, params/team.yaml): parsed, never started.

No Docker or cluster needed: these catch what a review misses and a deploy finds too late (a port open to
the network, a literal password, a variable .env.example does not mention, a GPU worker without a GPU,
a k8s script copy that drifted from its source).
"""
from __future__ import annotations

import json
import re

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


def _k8s_objects() -> list[dict]:
    return [o for p in sorted(K8S.glob("*.yaml")) for o in yaml.safe_load_all(p.read_text()) if o]


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
    # k8s reads the same keys from the Secret made of infra/.env.
    k8s_keys = set(re.findall(r"secretKeyRef: \{name: qlora-ops-secrets, key: ([A-Z0-9_]+)\}",
                              " ".join(p.read_text() for p in K8S.glob("*.yaml"))))
    tmpl = json.loads((INFRA / "prefect" / "work-pool-gpu-kubernetes.json").read_text())
    k8s_keys |= {e["valueFrom"]["secretKeyRef"]["key"]
                 for e in tmpl["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert k8s_keys and k8s_keys <= set(keys), k8s_keys - set(keys)
    secret_example = yaml.safe_load((K8S / "secret.yaml.example").read_text())
    assert set(secret_example["stringData"]) == k8s_keys
    assert all(v == "" for v in secret_example["stringData"].values())


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
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
        assert env["QLORA_OPS_HOME"] == "/app"
    assert "WORKDIR /app" in (INFRA / "Dockerfile").read_text()


def test_pools_and_gpu_reservation(compose):
    services = compose["services"]
    cpu, gpu = services["worker"], services["gpu-worker"]
    assert "--pool qlora-ops " in _cmd(cpu["command"]) + " "
    assert f"--pool {GPU_POOL}" in _cmd(gpu["command"])
    assert gpu["environment"]["QLORA_OPS_POOL"] == GPU_POOL
    assert gpu["environment"]["QLORA_OPS_POOL_TEMPLATE"] == "infra/prefect/work-pool-gpu.json"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in cpu
    assert "cu" in gpu["build"]["args"]["TORCH_INDEX_URL"]  # a CUDA torch build, not the CPU default
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
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t.get("key") == "nvidia.com/gpu" for t in pod["tolerations"])
    props = tmpl["variables"]["properties"]
    assert props["env"]["default"]["HF_HUB_OFFLINE"] == "1"
    assert props["namespace"]["default"] == "qlora-ops"
    # The real schema of the kubernetes worker (prefect-kubernetes is in the test extra).
    from prefect_kubernetes.worker import KubernetesWorker
    default = KubernetesWorker.get_default_base_job_template()
    assert set(jc) == set(default["job_configuration"])
    assert set(props) == set(default["variables"]["properties"])


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
    for name in ("qlora-ops-worker", "qlora-ops-worker-gpu"):
        env = {e["name"]: e for e in container(name)["env"]}
        assert env["PREFECT_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"]["key"] == "PREFECT_AUTH_STRING"
        assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
    # No literal credential anywhere: every secret-looking env var is a secretKeyRef or built from one.
    for o in objs:
        spec = o.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []):
            for e in c.get("env", []):
                if SECRET_KEY.search(e["name"]):
                    assert "secretKeyRef" in e.get("valueFrom", {}), (o["metadata"]["name"], e)
                if m := USERINFO.search(e.get("value", "")):
                    assert re.fullmatch(r"\$\([A-Z0-9_]+\)", m.group("password")), (o["metadata"]["name"], e)


def test_k8s_init_scripts_are_copies():
    cm = next(o for o in _k8s_objects() if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "qlora-ops-init")
    assert cm["data"]["postgres-init.sh"] == (INFRA / "postgres-init.sh").read_text()
    assert cm["data"]["minio-init.sh"] == (INFRA / "minio-init.sh").read_text()


def test_team_params_validate_and_point_at_the_stack():
    from tasks.config import load_params

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
              "docs/architecture.md"):
        assert s in deploy, s
    arch = (ROOT / "docs" / "architecture.md").read_text()
    assert arch.count("```mermaid") == 1
    for s in ("qlora-ops-gpu", "qlora-retrain", "qlora-model-stage", "MinIO", "Postgres", "dvc push", "drops"):
        assert s in arch, s
