"""Kubernetes: one Secret per service, and the GPU Jobs the Kubernetes worker creates cannot reach other
services' keys (docs/deploy.md, "Kubernetes"). Static: the manifests of infra/k8s/ are parsed, never applied.

Each check is a function returning its findings, run on infra/k8s/ here; the same functions, pointed at a
copy of the old single-Secret layout, report it (test_checks_catch_the_single_secret_layout).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.conftest import ROOT

K8S = ROOT / "infra" / "k8s"
TEMPLATE = ROOT / "infra" / "prefect" / "work-pool-gpu-kubernetes.json"
NS, GPU_NS = "qlora-ops", "qlora-ops-gpu"
GPU_SECRET = "qlora-ops-gpu-job"
PULL_SECRET = "qlora-ops-pull"  # the registry login (docker-registry Secret), made by hand per namespace
WORKLOADS = ("Deployment", "Job", "StatefulSet", "DaemonSet", "CronJob", "Pod", "ReplicaSet")


def _objects(k8s: Path) -> list[dict]:
    return [o for p in sorted(k8s.rglob("*.yaml")) if p.name != "kustomization.yaml"
            for o in yaml.safe_load_all(p.read_text()) if o]


def _examples(k8s: Path) -> dict[tuple[str, str], set[str]]:
    """(namespace, Secret) -> keys, from secret.yaml.example."""
    docs = [d for d in yaml.safe_load_all((k8s / "secret.yaml.example").read_text()) if d]
    return {(d["metadata"].get("namespace", NS), d["metadata"]["name"]): set(d.get("stringData") or d.get("data") or {})
            for d in docs}


def _pod_spec(o: dict) -> dict | None:
    if o["kind"] == "Pod":
        return o["spec"]
    if o["kind"] == "CronJob":
        return o["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return o["spec"]["template"]["spec"] if o["kind"] in WORKLOADS else None


def _template_job(namespace: str) -> dict:
    """The GPU pool template's Job (its manifest as written, placeholders and all), in the namespace the
    Kubernetes worker creates it in."""
    manifest = json.loads(TEMPLATE.read_text())["job_configuration"]["job_manifest"]
    return {**manifest, "metadata": {"name": "gpu-model-stage-job", "namespace": namespace}}


def _pods(objs: list[dict]) -> list[tuple[str, str, dict]]:
    """(namespace, name, pod spec) of every workload."""
    return [(o["metadata"].get("namespace", NS), o["metadata"]["name"], spec) for o in objs
            if (spec := _pod_spec(o)) is not None]


def _secret_refs(pod: dict) -> list[tuple[str, str | None]]:
    """(Secret, key or None for the whole Secret) of every reference a pod spec makes, but image pull secrets."""
    refs: list[tuple[str, str | None]] = []
    for c in pod.get("containers", []) + pod.get("initContainers", []) + pod.get("ephemeralContainers", []):
        for e in c.get("env", []):
            if (r := (e.get("valueFrom") or {}).get("secretKeyRef")) is not None:
                refs.append((r["name"], r["key"]))
        for f in c.get("envFrom", []):
            if "secretRef" in f:
                refs.append((f["secretRef"]["name"], None))
    for v in pod.get("volumes", []):
        if "secret" in v:
            items = v["secret"].get("items")
            refs += [(v["secret"]["secretName"], i["key"]) for i in items] if items else [(v["secret"]["secretName"], None)]
        for src in (v.get("projected") or {}).get("sources", []):
            if "secret" in src:
                items = src["secret"].get("items")
                refs += [(src["secret"]["name"], i["key"]) for i in items] if items else [(src["secret"]["name"], None)]
    return refs


# ---------------------------------------------------------------- the checks: each returns its findings
def refs_are_listed(k8s: Path, extra_pods=()) -> list[str]:
    """Every Secret reference names a Secret of the example, in the pod's namespace, and a key it holds."""
    examples, out = _examples(k8s), []
    for ns, name, pod in _pods(_objects(k8s)) + list(extra_pods):
        for secret, key in _secret_refs(pod):
            if (ns, secret) not in examples:
                out.append(f"{ns}/{name}: Secret {secret} is not in secret.yaml.example (namespace {ns})")
            elif key is None:
                out.append(f"{ns}/{name}: takes the whole Secret {secret}, not its own keys")
            elif key not in examples[(ns, secret)]:
                out.append(f"{ns}/{name}: Secret {secret} has no key {key}")
    return out


def secrets_hold_only_what_pods_read(k8s: Path, extra_pods=()) -> list[str]:
    """Each Secret of the example holds exactly the keys its pods read: every pod that references it reads
    every key it holds (so no pod sits next to another's key), and no Secret goes unread."""
    examples, out = _examples(k8s), []
    readers: dict[tuple[str, str], list[str]] = {}
    for ns, name, pod in _pods(_objects(k8s)) + list(extra_pods):
        read: dict[str, set] = {}
        for secret, key in _secret_refs(pod):
            read.setdefault(secret, set()).add(key)
        for secret, keys in read.items():
            readers.setdefault((ns, secret), []).append(name)
            extra = examples.get((ns, secret), set()) - keys
            if extra:
                out.append(f"{ns}/{name}: its Secret {secret} also holds {sorted(extra)}, which it does not read")
    out += [f"{ns}/{secret}: no pod reads it" for ns, secret in examples if (ns, secret) not in readers]
    return out


def gpu_namespace_is_sealed(k8s: Path, extra_pods=()) -> list[str]:
    """Namespace qlora-ops-gpu exists, holds one Secret (the GPU Job's), and no pod there names another."""
    objs, out = _objects(k8s), []
    if not any(o["kind"] == "Namespace" and o["metadata"]["name"] == GPU_NS for o in objs):
        out.append(f"no Namespace {GPU_NS}")
    in_gpu = {s for ns, s in _examples(k8s) if ns == GPU_NS}
    if in_gpu != {GPU_SECRET}:
        out.append(f"Secrets of {GPU_NS}: {sorted(in_gpu)}, not just {GPU_SECRET}")
    for ns, name, pod in _pods(objs) + list(extra_pods):
        if ns == GPU_NS:
            out += [f"{name}: references Secret {s}" for s, _ in _secret_refs(pod) if s != GPU_SECRET]
            out += [f"{name}: pull secret {p['name']}" for p in pod.get("imagePullSecrets", []) if p["name"] != PULL_SECRET]
    for o in objs:
        if o["kind"] == "ServiceAccount" and o["metadata"].get("namespace") == GPU_NS:
            out += [f"ServiceAccount {o['metadata']['name']}: pull secret {p['name']}"
                    for p in o.get("imagePullSecrets", []) if p["name"] != PULL_SECRET]
    return out


def job_creation_only_in_gpu_namespace(k8s: Path) -> list[str]:
    """Whoever may create Jobs (or Pods) may do so only in qlora-ops-gpu: no ClusterRole, no such Role
    elsewhere; no Role reads Secrets; the Kubernetes worker's binding is there and only there."""
    objs, out = _objects(k8s), []
    creators = []
    for o in objs:
        if o["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            out.append(f"{o['kind']} {o['metadata']['name']}: cluster-wide")
        if o["kind"] != "Role":
            continue
        for rule in o.get("rules", []):
            verbs, res = set(rule.get("verbs", [])), set(rule.get("resources", []))
            if "secrets" in res or "*" in res:
                out.append(f"Role {o['metadata']['name']}: reaches Secrets")
            if verbs & {"create", "update", "patch", "*"} and res & {"jobs", "pods", "cronjobs", "deployments", "*"}:
                creators.append(o)
                if o["metadata"].get("namespace") != GPU_NS:
                    out.append(f"Role {o['metadata']['name']} in {o['metadata'].get('namespace')}: creates {sorted(res)}")
    if not creators:
        out.append("no Role creates the GPU Jobs")
    names = {(o["metadata"].get("namespace"), o["metadata"]["name"]) for o in creators}
    for o in objs:
        if o["kind"] == "RoleBinding" and (o["metadata"].get("namespace"), o["roleRef"]["name"]) in names:
            subjects = [(s["kind"], s.get("namespace"), s["name"]) for s in o["subjects"]]
            if subjects != [("ServiceAccount", NS, "qlora-ops-k8s-worker")]:
                out.append(f"RoleBinding {o['metadata']['name']}: binds {subjects}")
    return out


# ---------------------------------------------------------------- on infra/k8s/
def _gpu_job_as_created() -> tuple[str, str, dict]:
    """The GPU Job as the Kubernetes worker creates it (.ci/render_gpu_job.py, with the worker's own
    auth-string Secret settings from kubernetes-gpu-pool/worker.yaml), in namespace qlora-ops-gpu."""
    from tests.code.test_infra import K8S_WORKER_SECRET_SETTING, _render_gpu_job

    dep = next(o for o in _objects(K8S) if o["kind"] == "Deployment" and o["metadata"]["name"] == "qlora-ops-k8s-worker")
    settings = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]
                if e["name"].startswith(K8S_WORKER_SECRET_SETTING)}
    job = _render_gpu_job(settings)
    return GPU_NS, "gpu-model-stage-job", job["spec"]["template"]["spec"]


def test_every_secret_reference_is_listed_with_its_key():
    assert refs_are_listed(K8S) == []


def test_each_secret_holds_exactly_what_its_pods_read():
    # The GPU Job's keys are the template's (whatever Secret name it gives them: see the xfail below).
    tmpl = _template_job(GPU_NS)["spec"]["template"]["spec"]
    keys = {(GPU_SECRET, k) for _, k in _secret_refs(tmpl)}
    job = (GPU_NS, "gpu-model-stage-job", {"containers": [{"env": [
        {"name": k, "valueFrom": {"secretKeyRef": {"name": s, "key": k}}} for s, k in sorted(keys)]}]})
    assert secrets_hold_only_what_pods_read(K8S, [job]) == []
    # The Secrets that hold a server's root or admin credential are read by that server or its setup Job only.
    examples = _examples(K8S)
    for key in ("MINIO_ROOT_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "POSTGRES_PASSWORD"):
        holders = {s for (ns, s), ks in examples.items() if key in ks}
        assert all(ns == NS for ns, s in examples if s in holders), key
        assert holders <= {"qlora-ops-minio", "qlora-ops-minio-init", "qlora-ops-minio-events", "qlora-ops-mlflow",
                           "qlora-ops-mlflow-setup", "qlora-ops-postgres"}, (key, holders)


def test_gpu_namespace_holds_only_the_gpu_job_secret():
    assert gpu_namespace_is_sealed(K8S) == []
    # Everything the Job uses is in its namespace: its ServiceAccount, its state PVC, its ConfigMap.
    tmpl = _template_job(GPU_NS)["spec"]["template"]["spec"]
    props = json.loads(TEMPLATE.read_text())["variables"]["properties"]
    have = {(o["kind"], o["metadata"]["name"]) for o in _objects(K8S) if o["metadata"].get("namespace") == GPU_NS}
    assert ("ServiceAccount", props["service_account_name"]["default"]) in have
    for v in tmpl["volumes"]:
        if "persistentVolumeClaim" in v:
            assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in have
    for f in tmpl["containers"][0]["envFrom"]:
        assert ("ConfigMap", f["configMapRef"]["name"]) in have
    # ... and it names the servers of qlora-ops by their namespace (a short name resolves in its own only).
    cm = next(o for o in _objects(K8S) if o["kind"] == "ConfigMap" and o["metadata"].get("namespace") == GPU_NS)
    assert cm["data"]["PREFECT_API_URL"] == "http://prefect-server.qlora-ops.svc:4200/api"
    assert cm["data"]["MLFLOW_TRACKING_URI"] == "http://mlflow.qlora-ops.svc:5000"
    worker = next(o for o in _objects(K8S) if o["kind"] == "Deployment" and o["metadata"]["name"] == "qlora-ops-k8s-worker")
    env = {e["name"]: e for e in worker["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PREFECT_API_URL"]["value"] == cm["data"]["PREFECT_API_URL"]  # the worker hands its own URL to every Job


def test_gpu_job_as_created_references_only_its_own_secret():
    props = json.loads(TEMPLATE.read_text())["variables"]["properties"]
    assert props["namespace"]["default"] == GPU_NS
    job = _gpu_job_as_created()
    assert refs_are_listed(K8S, [job]) == []
    assert gpu_namespace_is_sealed(K8S, [job]) == []


def test_the_worker_creates_jobs_only_in_the_gpu_namespace():
    assert job_creation_only_in_gpu_namespace(K8S) == []
    objs = _objects(K8S)
    role = next(o for o in objs if o["kind"] == "Role" and o["metadata"]["name"] == "qlora-ops-k8s-worker")
    assert role["metadata"]["namespace"] == GPU_NS
    # The Prefect worker's verbs (as in Prefect's helm chart), nothing more.
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["events", "pods", "pods/log", "pods/status"], "verbs": ["get", "watch", "list"]},
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]}]
    assert not any(o["kind"] in ("Role", "RoleBinding") and o["metadata"]["namespace"] == NS for o in objs)


def test_gpu_namespace_network_policies():
    """qlora-ops-gpu: default deny, DNS, the Prefect API and MLflow of qlora-ops, nothing else; and on the
    receiving side only MLflow and the Prefect server admit that namespace's (labelled) pods."""
    objs = _objects(K8S)
    pols = {(o["metadata"]["namespace"], o["metadata"]["name"]): o["spec"] for o in objs if o["kind"] == "NetworkPolicy"}
    gpu = {name: spec for (ns, name), spec in pols.items() if ns == GPU_NS}
    assert gpu["default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    assert gpu["allow-dns"] == pols[(NS, "allow-dns")]
    ns_sel = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": NS}}}
    allowed = [{"to": [{**ns_sel, "podSelector": {"matchLabels": {"app.kubernetes.io/name": server}}}],
                "ports": [{"protocol": "TCP", "port": port}]} for server, port in (("mlflow", 5000), ("prefect-server", 4200))]
    for name, spec in gpu.items():
        assert "ingress" not in spec, name  # nothing reaches the Jobs
        for rule in spec.get("egress", []):
            assert rule in allowed or rule == pols[(NS, "allow-dns")]["egress"][0], (name, rule)
    assert {json.dumps(r, sort_keys=True) for s in gpu.values() for r in s.get("egress", [])} >= \
        {json.dumps(r, sort_keys=True) for r in allowed}
    # The pool template's Job carries exactly the labels those egress policies select.
    labels = json.loads(TEMPLATE.read_text())["job_configuration"]["job_manifest"]["spec"]["template"]["metadata"]["labels"]
    assert {k for k, v in labels.items() if k.startswith("qlora-ops/") and v == "true"} == \
        {"qlora-ops/prefect-client", "qlora-ops/mlflow-client"}
    # Receiving side: only MLflow and the Prefect server name another namespace, and only qlora-ops-gpu.
    for (ns, name), spec in pols.items():
        for rule in spec.get("ingress", []):
            for peer in rule.get("from", []):
                assert "ipBlock" not in peer, (ns, name)
                if "namespaceSelector" in peer:
                    assert ns == NS and name in ("mlflow", "prefect-server"), (ns, name)
                    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": GPU_NS}}
                    assert "podSelector" in peer  # the labelled pods of that namespace, not all of them


def test_namespaces_and_kustomization():
    """Both namespaces at Pod Security `restricted`; every namespaced object names its namespace (the
    kustomization sets none, so `kubectl apply -k` keeps qlora-ops-gpu's objects there)."""
    objs = _objects(K8S)
    namespaces = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Namespace"}
    assert set(namespaces) == {NS, GPU_NS}
    for ns in namespaces.values():
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for o in objs:
        if o["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert o["metadata"].get("namespace") in (NS, GPU_NS), (o["kind"], o["metadata"]["name"])
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert "namespace" not in kust and "namespace.yaml" in kust["resources"]
    kubectl = shutil.which("kubectl")
    if kubectl:  # the real build, where kubectl is at hand (kustomize is built into it; no cluster needed)
        r = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        built = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in yaml.safe_load_all(r.stdout) if o}
        assert ("Namespace", None, GPU_NS) in built and ("NetworkPolicy", GPU_NS, "default-deny") in built
        assert ("Deployment", NS, "mlflow") in built


# ---------------------------------------------------------------- make-secrets.sh
def _fake_env(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """An env file with a distinct dummy value for every key the Secrets hold (and one key no Secret holds)."""
    keys = sorted({k for ks in _examples(K8S).values() for k in ks})
    values = {k: f"V4L-{i:02d}-{k.lower()[:6]}" for i, k in enumerate(keys)}
    env_file = tmp_path / "test.env"
    env_file.write_text("# comment\nQLORA_NOT_A_SECRET_KEY=V4L-unused\n" + "".join(f"{k}={v}\n" for k, v in values.items()))
    env_file.chmod(0o600)
    return env_file, values


def _parse_dry_run(stdout: str) -> dict[tuple[str, str], set[str]]:
    out = {}
    for line in stdout.splitlines():
        where, _, keys = line.partition(": ")
        ns, _, name = where.partition("/")
        out[(ns, name)] = set(keys.split())
    return out


def test_make_secrets_dry_run_lists_every_secret_and_no_value(tmp_path):
    env_file, values = _fake_env(tmp_path)
    r = subprocess.run(["bash", str(K8S / "make-secrets.sh"), "--dry-run", str(env_file)],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert _parse_dry_run(r.stdout) == _examples(K8S)  # the script and the example list the same Secrets and keys
    for v in list(values.values()) + ["V4L-unused"]:
        assert v not in r.stdout + r.stderr
    # An unset or empty key is named (never a value), and the real run then creates nothing.
    partial = tmp_path / "partial.env"
    partial.write_text("".join(f"{k}={'' if k == 'MINIO_ROOT_PASSWORD' else v}\n" for k, v in values.items()
                               if k != "MLFLOW_ADMIN_PASSWORD"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(f"#!/bin/sh\ntouch {tmp_path}/kubectl-called\n")
    (bin_dir / "kubectl").chmod(0o755)
    r = subprocess.run(["bash", str(K8S / "make-secrets.sh"), str(partial)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert r.returncode == 1 and "MINIO_ROOT_PASSWORD" in r.stderr and "MLFLOW_ADMIN_PASSWORD" in r.stderr
    assert not (tmp_path / "kubectl-called").exists()
    assert not any(v in r.stdout + r.stderr for v in values.values())


_FAKE_KUBECTL = r'''#!/bin/bash
# argv, one call a line; the --from-env-file file's mode and content; apply's stdin
printf '%s\n' "$*" >> "$FAKE_LOG/argv"
if [ "$3" = create ]; then
  prev=""
  for a in "$@"; do
    if [ "$prev" = --from-env-file ]; then
      stat -c '%a' "$a" >> "$FAKE_LOG/modes"
      { echo "== $2 $6"; cat "$a"; } >> "$FAKE_LOG/files"
      echo "$a" >> "$FAKE_LOG/paths"
    fi
    prev=$a
  done
  echo "kind: Secret # $2 $6"
else
  cat >> "$FAKE_LOG/stdin"
fi
'''


def test_make_secrets_puts_no_value_on_a_command_line(tmp_path):
    """The real run, with kubectl replaced by a recorder: no value in any argv, each Secret made from a
    mode-600 file of exactly its own keys, removed afterwards, and piped to `kubectl apply` on stdin."""
    env_file, values = _fake_env(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(_FAKE_KUBECTL)
    (bin_dir / "kubectl").chmod(0o755)
    log = tmp_path / "log"
    log.mkdir()
    r = subprocess.run(["bash", str(K8S / "make-secrets.sh"), str(env_file)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_LOG": str(log)})
    assert r.returncode == 0, r.stderr
    argv = (log / "argv").read_text()
    for v in list(values.values()) + ["V4L-unused"]:
        assert v not in argv, f"a value on a command line:\n{argv}"
        assert v not in r.stdout + r.stderr
    examples = _examples(K8S)
    creates = [line.split() for line in argv.splitlines() if " create secret generic " in line]
    assert {(c[1], c[5]) for c in creates} == set(examples) and len(creates) == len(examples)
    assert all(c[0] == "-n" and "--dry-run=client" in c for c in creates)
    applies = [line for line in argv.splitlines() if line.startswith("apply ")]
    assert len(applies) == len(examples) and all("--server-side" in a and a.endswith("-f -") for a in applies)
    # each Secret's file: mode 600, exactly its keys with their values, gone afterwards
    assert set((log / "modes").read_text().split()) == {"600"}
    files: dict[tuple[str, str], dict[str, str]] = {}
    for chunk in (log / "files").read_text().split("== ")[1:]:
        head, *lines = chunk.strip("\n").split("\n")
        ns, name = head.split()
        files[(ns, name)] = dict(line.split("=", 1) for line in lines)
    assert {k: set(v) for k, v in files.items()} == examples
    assert all(values[k] == v for f in files.values() for k, v in f.items())
    assert not any(Path(p).exists() for p in (log / "paths").read_text().split())
    assert (log / "stdin").read_text().count("kind: Secret") == len(examples)


# ---------------------------------------------------------------- the checks catch the old layout
def test_checks_catch_the_single_secret_layout(tmp_path):
    """The checks above, on a copy of infra/k8s/ turned back into the single-Secret layout (one Secret
    qlora-ops-secrets with every key, every reference to it, the Jobs' Role in qlora-ops, no qlora-ops-gpu):
    each of them reports it."""
    old = tmp_path / "k8s"
    shutil.copytree(K8S, old)
    every = sorted({k for ks in _examples(K8S).values() for k in ks})
    (old / "secret.yaml.example").write_text(yaml.safe_dump(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "qlora-ops-secrets", "namespace": NS},
         "stringData": {k: "" for k in every}}))
    names = {s for _, s in _examples(K8S)}
    for p in old.rglob("*.yaml"):
        text = p.read_text()
        for s in sorted(names, key=len, reverse=True):
            text = text.replace(f"name: {s}, key:", "name: qlora-ops-secrets, key:")
        text = text.replace(f"namespace: {GPU_NS}", f"namespace: {NS}")
        p.write_text(text)
    ns_docs = [d for d in yaml.safe_load_all((old / "namespace.yaml").read_text()) if d and d["metadata"]["name"] == NS]
    (old / "namespace.yaml").write_text(yaml.safe_dump_all(ns_docs))
    assert refs_are_listed(old) == []  # consistent in itself: every key is in the one Secret ...
    assert secrets_hold_only_what_pods_read(old)  # ... but each pod can name any other pod's key
    assert gpu_namespace_is_sealed(old)
    assert job_creation_only_in_gpu_namespace(old)
    # and a Job of the GPU namespace that names a server's Secret, as an edited pool template could
    planted = (GPU_NS, "planted", {"containers": [{"env": [
        {"name": "X", "valueFrom": {"secretKeyRef": {"name": "qlora-ops-minio", "key": "MINIO_ROOT_PASSWORD"}}}]}]})
    assert refs_are_listed(K8S, [planted]) and gpu_namespace_is_sealed(K8S, [planted])
