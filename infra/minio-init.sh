#!/bin/sh
# One-shot and idempotent (compose service minio-init, k8s Job minio-init; the k8s ConfigMap
# qlora-ops-init must stay a copy of this file): the bucket, and an application user that can touch
# only that bucket. MLflow (proxied artifacts under mlartifacts/) and the workers (DVC remote under dvc/,
# new data under drops/) use the application user; the MinIO root credentials stay in this script.
set -eu
bucket="${QLORA_OPS_BUCKET:-qlora-ops}"
: "${QLORA_S3_ACCESS_KEY:?QLORA_S3_ACCESS_KEY is not set}" "${QLORA_S3_SECRET_KEY:?QLORA_S3_SECRET_KEY is not set}"
# MinIO may still be starting (k8s gives no ordering): retry until the root login works.
tries=0
until mc alias set store "${MINIO_ENDPOINT:-http://minio:9000}" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null; do
  tries=$((tries + 1)); [ "$tries" -lt 60 ] || exit 1; sleep 2
done
mc mb --ignore-existing "store/$bucket"
umask 077
cat > /tmp/qlora-ops-policy.json <<JSON
{"Version": "2012-10-17",
 "Statement": [{"Effect": "Allow", "Action": ["s3:*"],
                "Resource": ["arn:aws:s3:::$bucket", "arn:aws:s3:::$bucket/*"]}]}
JSON
mc admin policy create store qlora-ops-app /tmp/qlora-ops-policy.json
mc admin user add store "$QLORA_S3_ACCESS_KEY" "$QLORA_S3_SECRET_KEY"   # on a re-run: resets the secret to .env's
# A re-run finds the policy attached already, which mc reports as an error; the check below is the real one.
mc admin policy attach store qlora-ops-app --user "$QLORA_S3_ACCESS_KEY" >/dev/null 2>&1 || true
mc admin user info store "$QLORA_S3_ACCESS_KEY" | grep -q qlora-ops-app
echo "bucket $bucket ready; user $QLORA_S3_ACCESS_KEY has policy qlora-ops-app"
