#!/bin/sh
# Make sure the work pool exists with our base job template before the worker starts. A worker that
# finds no pool creates one from Prefect's default template, which lacks the offline HF_* env defaults;
# an existing pool is left alone, so edits made since (UI, `--overwrite`) survive restarts.
pool="${QLORA_OPS_POOL:-qlora-ops}"
if ! prefect work-pool inspect "$pool" >/dev/null 2>&1; then
  # `|| true`: another replica may have created it in between; the worker start below is the real check.
  prefect work-pool create "$pool" --type process --base-job-template infra/prefect/work-pool.json || true
fi
exec "$@"
