#!/bin/sh
# One-shot and idempotent (compose service minio-events, k8s Job minio-events; the k8s ConfigMap
# qlora-ops-relay-init must stay a copy of this file): every object created under drops/ in the bucket is
# sent to webhook target QLORA, which the MinIO server defines from its MINIO_NOTIFY_WEBHOOK_*_QLORA
# environment (endpoint http://relay:8080/minio, the relay's token, a queue directory that holds
# notifications while the relay is down). Runs after minio-init (the bucket must exist).
set -eu
bucket="${QLORA_OPS_BUCKET:-qlora-ops}"
: "${MINIO_ROOT_USER:?MINIO_ROOT_USER is not set}" "${MINIO_ROOT_PASSWORD:?MINIO_ROOT_PASSWORD is not set}"
# The password reaches mc on stdin (printf is a shell builtin), never as an argument that `ps` shows.
tries=0
until printf '%s\n' "$MINIO_ROOT_PASSWORD" | mc alias set store "${MINIO_ENDPOINT:-http://minio:9000}" "$MINIO_ROOT_USER" >/dev/null; do
  tries=$((tries + 1)); [ "$tries" -lt 60 ] || exit 1; sleep 2
done
# put = s3:ObjectCreated:* (PutObject, CompleteMultipartUpload, CopyObject): a finished object, never a part.
mc event add "store/$bucket" arn:minio:sqs::QLORA:webhook --event put --prefix drops/ --ignore-existing
mc event list "store/$bucket" arn:minio:sqs::QLORA:webhook | grep -q drops/
echo "bucket $bucket: objects created under drops/ are sent to the relay"
