#!/bin/sh
# One-shot and idempotent (compose service minio-init, k8s Job minio-init; the k8s ConfigMap
# qlora-ops-init must stay a copy of this file): the bucket, with versioning, and one S3 user per role,
# each with a policy that names exactly the prefixes and actions that role needs:
#
#   role     key (infra/.env)              may
#   mlflow   QLORA_S3_MLFLOW_ACCESS_KEY    read/write/delete mlartifacts/ (the MLflow server proxies every artifact)
#   worker   QLORA_S3_WORKER_ACCESS_KEY    read/write dvc/ (DVC remote), read drops/ (new data); no delete
#   dropper  QLORA_S3_DROP_ACCESS_KEY      put under drops/ only: no read, no list, no delete
#
# Why this matters: a registered model is an MLflow artifact, so whoever can write mlartifacts/ can
# change what every machine that loads a model runs. Only the MLflow server can. Versioning keeps every
# overwritten or deleted object recoverable (`mc ls --versions`, `mc cp --version-id`).
# The MinIO root login stays in this script and the minio container. POSIX sh with mc and shell
# builtins only: the mc image (ubi-micro) has no grep or sed.
set -eu
bucket="${QLORA_OPS_BUCKET:-qlora-ops}"
: "${MINIO_ROOT_USER:?MINIO_ROOT_USER is not set}" "${MINIO_ROOT_PASSWORD:?MINIO_ROOT_PASSWORD is not set}"
: "${QLORA_S3_MLFLOW_ACCESS_KEY:?QLORA_S3_MLFLOW_ACCESS_KEY is not set}" "${QLORA_S3_MLFLOW_SECRET_KEY:?QLORA_S3_MLFLOW_SECRET_KEY is not set}"
: "${QLORA_S3_WORKER_ACCESS_KEY:?QLORA_S3_WORKER_ACCESS_KEY is not set}" "${QLORA_S3_WORKER_SECRET_KEY:?QLORA_S3_WORKER_SECRET_KEY is not set}"
: "${QLORA_S3_DROP_ACCESS_KEY:?QLORA_S3_DROP_ACCESS_KEY is not set}" "${QLORA_S3_DROP_SECRET_KEY:?QLORA_S3_DROP_SECRET_KEY is not set}"
# One key per role: a key named twice would end up holding both policies.
if [ "$QLORA_S3_MLFLOW_ACCESS_KEY" = "$QLORA_S3_WORKER_ACCESS_KEY" ] || [ "$QLORA_S3_MLFLOW_ACCESS_KEY" = "$QLORA_S3_DROP_ACCESS_KEY" ] \
   || [ "$QLORA_S3_WORKER_ACCESS_KEY" = "$QLORA_S3_DROP_ACCESS_KEY" ]; then
  echo "QLORA_S3_MLFLOW_ACCESS_KEY, QLORA_S3_WORKER_ACCESS_KEY and QLORA_S3_DROP_ACCESS_KEY must be three different names" >&2
  exit 1
fi
policy_dir="${QLORA_OPS_POLICY_DIR:-/tmp/qlora-ops-policies}"
umask 077
mkdir -p "$policy_dir"

# MinIO may still be starting (k8s gives no ordering): retry until the root login works. Every secret
# reaches mc on stdin (printf is a shell builtin), never as an argument: `ps` shows arguments to everyone.
tries=0
until printf '%s\n' "$MINIO_ROOT_PASSWORD" | mc alias set store "${MINIO_ENDPOINT:-http://minio:9000}" "$MINIO_ROOT_USER" >/dev/null; do
  tries=$((tries + 1)); [ "$tries" -lt 60 ] || exit 1; sleep 2
done
mc mb --ignore-existing "store/$bucket"
mc version enable "store/$bucket"

b="arn:aws:s3:::$bucket"
# ListBucket is a bucket action: the s3:prefix condition is what limits a listing to the role's prefixes.
mlflow_policy='{"Version": "2012-10-17", "Statement": [
 {"Sid": "ListArtifacts", "Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": ["'"$b"'"],
  "Condition": {"StringLike": {"s3:prefix": ["mlartifacts", "mlartifacts/*"]}}},
 {"Sid": "Locate", "Effect": "Allow", "Action": ["s3:GetBucketLocation"], "Resource": ["'"$b"'"]},
 {"Sid": "Artifacts", "Effect": "Allow",
  "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
  "Resource": ["'"$b"'/mlartifacts/*"]}]}'
# No DeleteObject: DVC's remote is content-addressed and `dvc push` never deletes; `dvc gc -c` is an
# operator's job with the root login.
worker_policy='{"Version": "2012-10-17", "Statement": [
 {"Sid": "ListDvcAndDrops", "Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": ["'"$b"'"],
  "Condition": {"StringLike": {"s3:prefix": ["dvc", "dvc/*", "drops", "drops/*"]}}},
 {"Sid": "Locate", "Effect": "Allow", "Action": ["s3:GetBucketLocation"], "Resource": ["'"$b"'"]},
 {"Sid": "DvcRemote", "Effect": "Allow",
  "Action": ["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
  "Resource": ["'"$b"'/dvc/*"]},
 {"Sid": "ReadDrops", "Effect": "Allow", "Action": ["s3:GetObject"], "Resource": ["'"$b"'/drops/*"]}]}'
dropper_policy='{"Version": "2012-10-17", "Statement": [
 {"Sid": "PutDrops", "Effect": "Allow", "Action": ["s3:PutObject", "s3:AbortMultipartUpload"],
  "Resource": ["'"$b"'/drops/*"]}]}'

role() {  # role POLICY_NAME ACCESS_KEY SECRET_KEY POLICY_JSON
  printf '%s\n' "$4" > "$policy_dir/$1.json"
  mc admin policy create store "$1" "$policy_dir/$1.json"   # on a re-run: replaces the policy with this one
  printf '%s\n' "$3" | mc admin user add store "$2" >/dev/null  # secret key on stdin; a re-run resets it to .env's
  # The single all-bucket policy of earlier versions of this script, in case this key held it.
  mc admin policy detach store qlora-ops-app --user "$2" >/dev/null 2>&1 || true
  # A re-run finds the policy attached already, which mc reports as an error; the check below is the real one.
  mc admin policy attach store "$1" --user "$2" >/dev/null 2>&1 || true
  info=$(mc admin user info store "$2")
  case "$info" in
    *"$1"*) echo "user $2: policy $1" ;;
    *) echo "user $2 did not get policy $1" >&2; exit 1 ;;
  esac
}
role qlora-ops-mlflow "$QLORA_S3_MLFLOW_ACCESS_KEY" "$QLORA_S3_MLFLOW_SECRET_KEY" "$mlflow_policy"
role qlora-ops-worker "$QLORA_S3_WORKER_ACCESS_KEY" "$QLORA_S3_WORKER_SECRET_KEY" "$worker_policy"
role qlora-ops-dropper "$QLORA_S3_DROP_ACCESS_KEY" "$QLORA_S3_DROP_SECRET_KEY" "$dropper_policy"
echo "bucket $bucket ready (versioning on), one user per role"
