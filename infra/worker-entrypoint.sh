#!/bin/sh
# Make sure the work pool exists with our base job template before the worker starts. A worker that
# finds no pool creates one from Prefect's default template, which lacks the offline HF_* env defaults;
# an existing pool is left alone, so edits made since (UI, `--overwrite`) survive restarts.
# QLORA_OPS_POOL / QLORA_OPS_POOL_TEMPLATE: the CPU pool (work-pool.json) or the GPU pool (work-pool-gpu.json).
pool="${QLORA_OPS_POOL:-qlora-ops}"
template="${QLORA_OPS_POOL_TEMPLATE:-infra/prefect/work-pool.json}"
if ! prefect work-pool inspect "$pool" >/dev/null 2>&1; then
  # `|| true`: another replica may have created it in between; the worker start below is the real check.
  prefect work-pool create "$pool" --type process --base-job-template "$template" || true
fi
exec "$@"
