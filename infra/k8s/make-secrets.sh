#!/usr/bin/env bash
# Make every Secret of infra/k8s/ from infra/.env: one per service, each with only the keys its pods
# read (secret.yaml.example lists the same Secrets and keys; tests/code/test_k8s_secrets.py keeps them
# equal). Run after `kubectl apply -f infra/k8s/namespace.yaml` (the Secrets live in qlora-ops and, for
# the Kubernetes GPU pool's Jobs, qlora-ops-gpu), before `kubectl apply -k infra/k8s/`; run again after
# changing infra/.env (it replaces the Secrets' data; restart the pods that read a changed key).
#
#   bash infra/k8s/make-secrets.sh --dry-run [infra/.env]   # prints each namespace/Secret and its keys, never a value
#   bash infra/k8s/make-secrets.sh [infra/.env]             # creates or updates them (kubectl's current context)
#
# No value ever reaches a command line (`ps` shows those to every user): each Secret's lines of the env
# file are copied into a temporary file of mode 600 (removed on exit) for `kubectl create secret generic
# --from-env-file`, whose output goes to `kubectl apply` on stdin. Server-side apply: no
# last-applied-configuration annotation holding a second copy of the values. Every key must be set and
# non-empty, or nothing is created. Values are taken as kubectl reads an env file: verbatim, no quotes.
set -euo pipefail

# namespace, Secret, its keys
SECRETS=(
  "qlora-ops qlora-ops-postgres POSTGRES_PASSWORD PREFECT_DB_PASSWORD MLFLOW_DB_PASSWORD"
  "qlora-ops qlora-ops-prefect-server PREFECT_DB_PASSWORD PREFECT_AUTH_STRING"
  "qlora-ops qlora-ops-prefect-db-upgrade PREFECT_DB_PASSWORD"
  "qlora-ops qlora-ops-mlflow MLFLOW_DB_PASSWORD MLFLOW_ADMIN_USERNAME MLFLOW_ADMIN_PASSWORD MLFLOW_FLASK_SECRET_KEY MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY QLORA_S3_MLFLOW_ACCESS_KEY QLORA_S3_MLFLOW_SECRET_KEY"
  "qlora-ops qlora-ops-mlflow-setup MLFLOW_ADMIN_USERNAME MLFLOW_ADMIN_PASSWORD MLFLOW_WORKER_USERNAME MLFLOW_WORKER_PASSWORD MLFLOW_TRAINER_USERNAME MLFLOW_TRAINER_PASSWORD MLFLOW_PROMOTER_USERNAME MLFLOW_PROMOTER_PASSWORD"
  "qlora-ops qlora-ops-minio MINIO_ROOT_USER MINIO_ROOT_PASSWORD QLORA_RELAY_SECRET"
  "qlora-ops qlora-ops-minio-init MINIO_ROOT_USER MINIO_ROOT_PASSWORD QLORA_S3_MLFLOW_ACCESS_KEY QLORA_S3_MLFLOW_SECRET_KEY QLORA_S3_WORKER_ACCESS_KEY QLORA_S3_WORKER_SECRET_KEY QLORA_S3_DROP_ACCESS_KEY QLORA_S3_DROP_SECRET_KEY"
  "qlora-ops qlora-ops-worker PREFECT_AUTH_STRING MLFLOW_WORKER_USERNAME MLFLOW_WORKER_PASSWORD QLORA_S3_WORKER_ACCESS_KEY QLORA_S3_WORKER_SECRET_KEY"
  "qlora-ops qlora-ops-worker-gpu PREFECT_AUTH_STRING MLFLOW_TRAINER_USERNAME MLFLOW_TRAINER_PASSWORD"
  "qlora-ops qlora-ops-relay PREFECT_AUTH_STRING QLORA_RELAY_SECRET"
  "qlora-ops qlora-ops-minio-events MINIO_ROOT_USER MINIO_ROOT_PASSWORD"
  "qlora-ops qlora-ops-k8s-worker PREFECT_AUTH_STRING"
  "qlora-ops-gpu qlora-ops-gpu-job PREFECT_AUTH_STRING MLFLOW_TRAINER_USERNAME MLFLOW_TRAINER_PASSWORD"
)

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
env_file=${1:-"$(dirname "$0")/../.env"}
[ -r "$env_file" ] || { echo "make-secrets: cannot read $env_file (cp infra/.env.example infra/.env, fill it in)" >&2; exit 2; }

# The last KEY=... line of the env file (as compose and kubectl take it); empty when absent. Builtins
# only from here on: the value is never in an argument of another process.
value_line() {
  local key=$1 line found=""
  while IFS= read -r line || [ -n "$line" ]; do
    case $line in "$key="*) found=$line ;; esac
  done < "$env_file"
  printf '%s' "$found"
}

declare -A missing=()
for entry in "${SECRETS[@]}"; do
  read -r ns name keys <<< "$entry"
  for key in $keys; do
    line=$(value_line "$key")
    [ -n "${line#*=}" ] || missing[$key]=1
  done
  if [ "$dry_run" = 1 ]; then echo "$ns/$name: $keys"; fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  printf 'make-secrets: not set or empty in %s:\n' "$env_file" >&2
  printf '  %s\n' "${!missing[@]}" | sort >&2
  [ "$dry_run" = 1 ] || exit 1
fi
[ "$dry_run" = 0 ] || exit 0

umask 077
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for entry in "${SECRETS[@]}"; do
  read -r ns name keys <<< "$entry"
  : > "$tmp/env"
  chmod 600 "$tmp/env"
  for key in $keys; do
    printf '%s\n' "$(value_line "$key")" >> "$tmp/env"
  done
  kubectl -n "$ns" create secret generic "$name" --from-env-file "$tmp/env" --dry-run=client -o yaml \
    | kubectl apply --server-side --force-conflicts --field-manager=qlora-ops-make-secrets -f -
  echo "make-secrets: $ns/$name ($keys)"
done
rm -f "$tmp/env"
