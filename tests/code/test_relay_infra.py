"""Static checks of the relay's infra (infra/relay/, its compose services, infra/k8s/relay.yaml): parsed,
never started (no Docker or cluster here). The relay's code runs for real in
tests/integration/test_drop_events.py; this holds its deployment to the stack's security style and
checks that the pieces agree with each other and with the code (token, endpoint, port, route, files).
"""
from __future__ import annotations

import ast
import re
from urllib.parse import urlsplit

import pytest
import yaml

from tests.conftest import ROOT

INFRA = ROOT / "infra"
REQUIRED_REF = re.compile(r"\$\{([A-Z0-9_]+):\?[^}]+\}")
DOCKERFILE = INFRA / "relay" / "Dockerfile"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all((INFRA / "k8s" / "relay.yaml").read_text()) if o}


def _route_and_port() -> tuple[str, int]:
    import qlora_ops.flows.relay as relay

    app = relay.create_app("x")
    paths = {r.path for r in app.routes}
    assert {"/minio", "/healthz"} <= paths
    return "/minio", 8080


def test_compose_relay_is_locked_down_and_agrees_with_minio(compose):
    s = compose["services"]
    relay, minio = s["relay"], s["minio"]
    assert "ports" not in relay  # MinIO reaches it on the compose network; nothing else should
    assert relay["read_only"] is True and relay["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in relay["security_opt"]
    assert not str(relay["user"]).startswith("0") and relay["tmpfs"] == ["/tmp"]
    assert relay["mem_limit"] and relay["cpus"] and relay["pids_limit"]
    assert "healthz" in " ".join(relay["healthcheck"]["test"])
    env = relay["environment"]
    # The relay holds the same auth string the server checks, and the same token MinIO sends.
    assert env["PREFECT_API_AUTH_STRING"] == s["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"]
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert REQUIRED_REF.fullmatch(env["QLORA_RELAY_SECRET"])
    menv = minio["environment"]
    assert menv["MINIO_NOTIFY_WEBHOOK_AUTH_TOKEN_QLORA"] == env["QLORA_RELAY_SECRET"]
    assert menv["MINIO_NOTIFY_WEBHOOK_ENABLE_QLORA"] == "on"
    assert menv["MINIO_NOTIFY_WEBHOOK_QUEUE_DIR_QLORA"].startswith("/")
    route, port = _route_and_port()
    ep = urlsplit(menv["MINIO_NOTIFY_WEBHOOK_ENDPOINT_QLORA"])
    assert (ep.hostname, ep.port, ep.path) == ("relay", port, route)
    assert f"--port\", \"{port}\"" in DOCKERFILE.read_text()
    # Droppers need nothing of Prefect: no dropper credential is anywhere near the relay.
    assert not any(k.startswith("AWS_") for k in env)
    ev = s["minio-events"]
    assert ev["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert (INFRA / ev["volumes"][0].split(":")[0].removeprefix("./")).is_file()
    assert "QLORA_RELAY_SECRET=\n" in (INFRA / ".env.example").read_text()


def test_relay_image_is_pinned_unprivileged_and_holds_what_the_relay_imports():
    import prefect

    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    # The server's Prefect release, the one this venv runs: client and server agree on the events API.
    assert base.startswith(f"docker.io/prefecthq/prefect:{prefect.__version__}-"), base
    assert re.search(r"^USER (\d+):(\d+)$", text, re.M) and not re.search(r"^USER 0", text, re.M)
    assert "HEALTHCHECK" in text and "RUN pip" not in text
    copied = re.search(r"^COPY (.+) qlora_ops/flows/$", text, re.M).group(1).split()
    for f in copied:
        assert (ROOT / f).is_file(), f
    # Everything the relay's modules import is in the image: the copied files, the stdlib, Prefect's deps.
    allowed = {"qlora_ops", "prefect", "starlette", "uvicorn"}
    for f in ("flows/relay.py", "flows/events.py"):
        assert f in copied
        for node in ast.walk(ast.parse((ROOT / f).read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for n in names:
                top = n.split(".")[0]
                assert top in allowed or top in __import__("sys").stdlib_module_names, f"{f} imports {n}"
                if top == "qlora_ops":
                    assert n.startswith("qlora_ops.flows."), f"{f} imports {n}: only qlora_ops.flows is in the image"
                    assert f"{n.removeprefix('qlora_ops.').replace('.', '/')}.py" in copied, f"{f} imports {n}, not copied into the image"


def test_k8s_relay_follows_the_stack_security_style(k8s):
    dep = k8s[("Deployment", "relay")]["spec"]["template"]["spec"]
    job = k8s[("Job", "minio-events")]["spec"]["template"]["spec"]
    for pod, sa in ((dep, "qlora-ops-relay"), (job, "minio-events")):
        assert pod["serviceAccountName"] == sa and pod["automountServiceAccountToken"] is False
        assert k8s[("ServiceAccount", sa)]["automountServiceAccountToken"] is False
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0 and sc["seccompProfile"]["type"] == "RuntimeDefault"
        for c in pod["containers"]:
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False and csc["readOnlyRootFilesystem"] is True
            assert csc["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
            assert ":" in c["image"] and not c["image"].endswith(":latest")
    relay = dep["containers"][0]
    route, port = _route_and_port()
    assert relay["ports"][0]["containerPort"] == port
    assert relay["livenessProbe"]["httpGet"]["path"] == relay["readinessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e for e in relay["env"]}
    assert env["PREFECT_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"]["key"] == "PREFECT_AUTH_STRING"
    assert env["QLORA_RELAY_SECRET"]["valueFrom"]["secretKeyRef"]["key"] == "QLORA_RELAY_SECRET"
    assert not any(k.startswith("AWS_") for k in env)
    svc = k8s[("Service", "relay")]["spec"]
    assert svc.get("type", "ClusterIP") == "ClusterIP" and svc["ports"][0]["port"] == port
    # MinIO (minio.yaml) sends to this Service with the same token.
    minio = next(o for o in yaml.safe_load_all((INFRA / "k8s" / "minio.yaml").read_text())
                 if o and o["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    menv = {e["name"]: e for e in minio["env"]}
    ep = urlsplit(menv["MINIO_NOTIFY_WEBHOOK_ENDPOINT_QLORA"]["value"])
    assert (ep.hostname, ep.port, ep.path) == (k8s[("Service", "relay")]["metadata"]["name"], port, route)
    assert menv["MINIO_NOTIFY_WEBHOOK_AUTH_TOKEN_QLORA"]["valueFrom"]["secretKeyRef"]["key"] == "QLORA_RELAY_SECRET"
    secrets = {d["metadata"]["name"]: d["stringData"] for d in yaml.safe_load_all((INFRA / "k8s" / "secret.yaml.example").read_text()) if d}
    assert "QLORA_RELAY_SECRET" in secrets[env["QLORA_RELAY_SECRET"]["valueFrom"]["secretKeyRef"]["name"]]
    assert "QLORA_RELAY_SECRET" in secrets[menv["MINIO_NOTIFY_WEBHOOK_AUTH_TOKEN_QLORA"]["valueFrom"]["secretKeyRef"]["name"]]
    # Only MinIO may call the relay (and MinIO may call it, under the namespace's default-deny); the relay
    # reaches the Prefect API as a labelled Prefect client, the Job MinIO as a labelled MinIO client.
    np = k8s[("NetworkPolicy", "relay")]["spec"]
    assert np["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "relay"} and np["policyTypes"] == ["Ingress"]
    assert [f["podSelector"]["matchLabels"] for f in np["ingress"][0]["from"]] == [{"app.kubernetes.io/name": "minio"}]
    assert np["ingress"][0]["ports"] == [{"protocol": "TCP", "port": port}]
    out = k8s[("NetworkPolicy", "minio-to-relay")]["spec"]
    assert out["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "minio"} and out["policyTypes"] == ["Egress"]
    assert out["egress"] == [{"to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "relay"}}}],
                              "ports": [{"protocol": "TCP", "port": port}]}]
    pod_labels = k8s[("Deployment", "relay")]["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["qlora-ops/prefect-client"] == "true"
    assert k8s[("Job", "minio-events")]["spec"]["template"]["metadata"]["labels"]["qlora-ops/minio-client"] == "true"
    policies = [o for o in yaml.safe_load_all((INFRA / "k8s" / "networkpolicy.yaml").read_text()) if o]
    selectors = {p["metadata"]["name"]: p["spec"]["podSelector"].get("matchLabels") for p in policies}
    assert selectors["prefect-clients"] == {"qlora-ops/prefect-client": "true"}
    assert selectors["minio-clients"] == {"qlora-ops/minio-client": "true"}
    kust = yaml.safe_load((INFRA / "k8s" / "kustomization.yaml").read_text())
    assert "relay.yaml" in kust["resources"]
    assert relay["image"].split(":")[0] in {i["name"] for i in kust["images"]}


def test_k8s_minio_events_script_is_a_copy(k8s):
    cm = k8s[("ConfigMap", "qlora-ops-relay-init")]
    script = (INFRA / "relay" / "minio-events.sh").read_text()
    assert cm["data"]["minio-events.sh"] == script
    # The ARN names MinIO's target QLORA (MINIO_NOTIFY_WEBHOOK_*_QLORA) and the prefix is where drops land.
    assert "arn:minio:sqs::QLORA:webhook --event put --prefix drops/" in script
    from qlora_ops.tasks.core.config import load_params
    assert load_params(ROOT / "params" / "team.yaml").data.source.endswith("/drops/")
