"""The dependency lock (locks/*.txt, made by `bash .ci/lock.sh`): its hash, what it pins, and whether
the running environment is the one it describes.

    python tasks/core/lockfile.py check     # the locks agree with each other and with pyproject.toml
    python -m qlora_ops.tasks.core.lockfile installed [--test | LOCK]   # this environment has every locked version

One lock per platform (pip requirements files with hashes; .ci/lock.sh says which is which). They pin
the same version of every package they share; torch is the exception: the CPU build (X+cpu) on Linux
CPU machines, PyPI's X (the CUDA build on Linux) in the GPU lock. `lock_hash` covers all of them, as
one lock: it is what tasks.model.keys puts into the run fingerprint and what every MLflow run is tagged with.
No import-time work, and nothing imported here but the standard library and `packaging`.
"""
from __future__ import annotations

import hashlib
import platform
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout (or site-packages) holding tasks/ and flows/
LOCK_DIR = "locks"
TEST_SUFFIX = "-test"
# The libraries that decide the model: their versions are tags of every MLflow run (issue 20).
DECISIVE = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
# What a CUDA torch needs and a CPU one does not: the only packages the GPU lock may add.
GPU_ONLY = re.compile(r"nvidia-.*|cuda-.*|triton|pytorch-triton")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def norm(name: str) -> str:
    """PEP 503 name: what importlib.metadata and the index agree on."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_files(root: Path = ROOT) -> list[Path]:
    return sorted((Path(root) / LOCK_DIR).glob("*.txt"))


def lock_hash(root: Path = ROOT) -> str | None:
    """sha256 (16 hex) of every lock file (names and bytes), or None without a locks/ dir (an installed
    wheel). Any regenerated lock changes it, like a new uv.lock would: the run fingerprint retrains."""
    files = lock_files(root)
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def platform_lock(test: bool = False) -> str:
    """The lock this machine installs (.ci/setup.sh makes the same choice; QLORA_OPS_LOCK overrides it there):
    Linux x86_64 with torch's CPU build (or none yet) -> linux-x86_64-cpu, with another torch -> linux-x86_64-cuda;
    macOS arm64 -> macos-arm64. `test`: the lock with the test extras (Linux CPU only)."""
    from importlib.metadata import PackageNotFoundError, version

    system, machine = platform.system(), platform.machine().lower()
    if system == "Darwin" and machine == "arm64":
        name = "macos-arm64"
    elif system == "Linux" and machine in ("x86_64", "amd64"):
        try:
            cpu = version("torch").endswith("+cpu")
        except PackageNotFoundError:
            cpu = True
        name = "linux-x86_64-cpu" if cpu else "linux-x86_64-cuda"
    else:
        raise LookupError(f"no lock for {system} {machine}: locks/ has Linux x86_64 (CPU, CUDA) and macOS arm64")
    return name + (TEST_SUFFIX if test else "")


def pins(path: Path) -> dict[str, tuple[str, str | None]]:
    """{normalized name: (version, environment marker or None)} of a lock file."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if m := _PIN.match(line):
            out[norm(m[1])] = (m[2], m[3])
    return out


def applies(marker: str | None) -> bool:
    """Whether a pin's environment marker holds for this interpreter and platform."""
    if not marker:
        return True
    from packaging.markers import Marker

    return Marker(marker).evaluate()


def installed_mismatches(path: Path) -> list[str]:
    """Every pin of the lock (for this interpreter and platform) the environment does not have, one line
    each: `name: locked X, installed Y` (or `not installed`). Packages the lock does not name are ignored."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    bad = []
    for name, (want, marker) in sorted(pins(path).items()):
        if not applies(marker):
            continue
        try:
            have = version(name)
        except PackageNotFoundError:
            bad.append(f"{name}: locked {want}, not installed")
            continue
        if Version(have) != Version(want):
            bad.append(f"{name}: locked {want}, installed {have}")
    return bad


def versions(names: tuple[str, ...] = DECISIVE) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = "none"
    return out


def run_tags(root: Path = ROOT) -> dict[str, str]:
    """What every MLflow run records of its environment: the lock's hash, the lock this platform installs,
    and the installed versions of the libraries that decide the model."""
    try:
        lock = platform_lock()
    except LookupError:
        lock = "none"
    return {"qlora_ops.lock_hash": lock_hash(root) or "none", "qlora_ops.lock": lock,
            **{f"qlora_ops.lib.{n}": v for n, v in versions().items()}}


def check(root: Path = ROOT) -> list[str]:
    """Problems with the locks, one line each (none: they agree). Every lock pins the same version of every
    package it shares with the others (torch aside); the GPU lock adds only GPU-only packages; the run lock
    is the test lock's subset; each satisfies pyproject.toml's requirements (a lock older than an edit of
    pyproject fails here: regenerate it with `bash .ci/lock.sh`)."""
    import tomllib

    from packaging.requirements import Requirement

    d = Path(root) / LOCK_DIR
    need = ["linux-x86_64-cpu", "linux-x86_64-cpu-test", "linux-x86_64-cuda", "macos-arm64", "no-deps"]
    if missing := [n for n in need if not (d / f"{n}.txt").is_file()]:
        return [f"{LOCK_DIR}/{n}.txt is missing: run `bash .ci/lock.sh`" for n in missing]
    locks = {n: pins(d / f"{n}.txt") for n in need}
    bad = []
    base = locks["linux-x86_64-cpu-test"]
    for n in ("linux-x86_64-cpu", "linux-x86_64-cuda", "macos-arm64"):
        for name, (v, _) in locks[n].items():
            if name != "torch" and name in base and base[name][0] != v:
                bad.append(f"{LOCK_DIR}/{n}.txt pins {name}=={v}, the test lock {base[name][0]}")
    if extra := sorted(set(locks["linux-x86_64-cpu"]) - set(base)):
        bad.append(f"{LOCK_DIR}/linux-x86_64-cpu.txt has packages the test lock lacks: {', '.join(extra)}")
    if extra := sorted(n for n in set(locks["linux-x86_64-cuda"]) - set(locks["linux-x86_64-cpu"]) if not GPU_ONLY.fullmatch(n)):
        bad.append(f"{LOCK_DIR}/linux-x86_64-cuda.txt adds more than GPU-only packages: {', '.join(extra)}")
    cpu_torch = locks["linux-x86_64-cpu"].get("torch", ("?",))[0]
    if not cpu_torch.endswith("+cpu"):
        bad.append(f"{LOCK_DIR}/linux-x86_64-cpu.txt pins torch=={cpu_torch}, not a CPU build (+cpu)")
    for n in ("linux-x86_64-cuda", "macos-arm64"):  # the same release; the build (+cu128, ...) may differ
        if (t := locks[n].get("torch", ("none",))[0]).split("+")[0] != cpu_torch.split("+")[0]:
            bad.append(f"{LOCK_DIR}/{n}.txt pins torch=={t}, the CPU lock {cpu_torch}")

    project = tomllib.loads((Path(root) / "pyproject.toml").read_text())
    own = project.get("tool", {}).get("qlora-ops", {})
    extras = project["project"].get("optional-dependencies", {})
    wanted = {n: project["project"]["dependencies"] for n in ("linux-x86_64-cpu", "linux-x86_64-cuda", "macos-arm64")}
    wanted["linux-x86_64-cpu-test"] = project["project"]["dependencies"] + [
        r for e in own.get("test-extras", []) for r in extras.get(e, [])]
    wanted["no-deps"] = own.get("no-deps", [])
    for n, reqs in wanted.items():
        for r in map(Requirement, reqs):
            pin = locks[n].get(norm(r.name))
            if pin is None:
                bad.append(f"pyproject.toml requires {r} but {LOCK_DIR}/{n}.txt has no {r.name}: run `bash .ci/lock.sh`")
            elif not r.specifier.contains(pin[0], prereleases=True):
                bad.append(f"pyproject.toml requires {r} but {LOCK_DIR}/{n}.txt pins {pin[0]}: run `bash .ci/lock.sh`")
    return bad


def main(argv: list[str]) -> int:
    if argv == ["check"]:
        bad = check()
    elif argv[:1] == ["installed"] and len(argv) <= 2:
        arg = argv[1] if len(argv) == 2 else None
        path = Path(arg) if arg not in (None, "--test") else ROOT / LOCK_DIR / f"{platform_lock(test=bool(arg))}.txt"
        bad = [f"{line} (from {path})" for line in installed_mismatches(path)]
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for line in bad:
        print(line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
