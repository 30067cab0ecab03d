"""Small helpers shared by stages: atomic writes, content hashes, directory manifests, and child
processes that die with their parent."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator


class DiskFull(OSError):
    """A write ran out of space (ENOSPC, EFBIG, EDQUOT): names the path it was writing and the free space."""


_FULL = ("No space left on device", "os error 28", "File too large", "os error 27", "Disk quota exceeded")


def disk_full(exc: BaseException, path: Path) -> DiskFull | None:
    """`exc` as a DiskFull naming `path`, or None if it is not a full disk. safetensors' and torch's
    writers raise their own types with only "os error 28" in the text, so the text counts too."""
    import errno

    if isinstance(exc, DiskFull):
        return exc
    if not (getattr(exc, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or any(w in str(exc) for w in _FULL)):
        return None
    try:
        free = f"{shutil.disk_usage(Path(path).parent).free / 2**20:.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    full = DiskFull(f"no space left while writing {path} ({exc}); {free} now. Nothing half-written was kept; "
                    "free some space and rerun")
    full.errno = errno.ENOSPC  # set apart: OSError(errno, text) would print "[Errno 28]" before the path
    return full


@contextmanager
def atomic_open(path: Path) -> Iterator[IO[str]]:
    """A text file written via temp file + fsync + rename, so readers never see half a file (crash-safe);
    on any error inside the block the temp file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if (full := disk_full(e, path)) is not None and full is not e:
            raise full from e
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temp dir beside `final`; when the block succeeds it replaces `final` with one
    rename, so `final` is always complete or absent (a crash mid-write leaves only the temp dir).
    The dir gets a MANIFEST (write_manifest) before the rename: readers check it with verify_manifest,
    which catches what a rename cannot (a file truncated or rewritten later, a disk that lied)."""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        write_manifest(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if (full := disk_full(e, final)) is not None and full is not e:
            raise full from e  # the writer's own error rarely names the file (safetensors: "os error 28")
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def read_jsonl(path: Path) -> list[dict]:
    """One JSON object per non-blank line. Splits on \n only: str.splitlines() would also split at
    U+2028, \x85, \x0c, which may sit unescaped inside a row."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def md5_file(path: Path, chunk: int = 1 << 20) -> str:
    """A file's md5: what S3 ETags and DVC's object names are, so an integrity check, not a security hash."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def sha256_dir(path: Path) -> str:
    """Hash of every file's relative name and content, in sorted order."""
    h = hashlib.sha256()
    root = Path(path)
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


# ---------------------------------------------------------------- directory manifests
MANIFEST = "qlora_ops_manifest.json"


def write_manifest(root: Path) -> None:
    """sha256 and size of every file under `root` (but the manifest itself), written last."""
    root = Path(root)
    files = {str(p.relative_to(root)): {"sha256": sha256_file(p), "size": p.stat().st_size}
             for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}
    atomic_write_json(root / MANIFEST, {"files": files})


def verify_manifest(root: Path) -> str | None:
    """None when every file the manifest lists is there with its size and hash; else what is wrong,
    naming the file (no manifest counts as wrong: every completed dir gets one)."""
    root = Path(root)
    try:
        files = read_json(root / MANIFEST)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{root / MANIFEST}: missing or unreadable ({type(e).__name__})"
    for rel, want in files.items():
        p = root / rel
        try:
            size = p.stat().st_size
        except OSError:
            return f"{p}: missing"
        if size != want["size"]:
            return f"{p}: {size} bytes, the manifest says {want['size']} (truncated or rewritten)"
        if sha256_file(p) != want["sha256"]:
            return f"{p}: sha256 differs from the manifest (corrupted or rewritten)"
    return None


class DamagedArtifact(RuntimeError):
    """A directory written with a manifest no longer matches it: it is never loaded."""


def check_manifest(root: Path) -> Path:
    """`root`, if it has no manifest (a model dir the user gave) or matches its manifest; else DamagedArtifact.
    Hashed once per process while no file's size or mtime changes: evaluate, merge and register load the
    same multi-GB base several times in one run."""
    root = Path(root)
    if not (root / MANIFEST).exists():
        return root
    state = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file())
    if _verified.get(root) == state:
        return root
    if (bad := verify_manifest(root)) is not None:
        raise DamagedArtifact(f"{root} does not match its manifest ({bad}); not loading it")
    _verified[root] = state
    return root


_verified: dict[Path, tuple] = {}


# ---------------------------------------------------------------- children that die with us
_PR_SET_PDEATHSIG = 1


def _die_with(parent_pid: int):
    """A preexec_fn: the kernel sends the child SIGKILL when its parent dies (PR_SET_PDEATHSIG), even by
    kill -9, so nothing a run starts outlives it. libc is resolved here, in the parent, not after fork."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died between fork and prctl
            os._exit(1)
    return preexec


def child_preexec():
    """The preexec_fn that ties a child to this process (None off Linux): for Popen and subprocess.run."""
    return _die_with(os.getpid()) if sys.platform.startswith("linux") else None


def popen_child(args, **kw) -> subprocess.Popen:
    """subprocess.Popen whose process is killed when this process dies (Linux; elsewhere a plain Popen).
    Call it from a long-lived thread (the main one): PDEATHSIG fires when the *thread* that forked exits."""
    kw.setdefault("preexec_fn", child_preexec())
    return subprocess.Popen(args, **kw)


def end_child(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """A stage's child still running when its caller stops waiting (cancelled, timed out): it must not outlive
    its stage. SIGTERM, then SIGKILL after `grace_s`."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


TIE_ENV = "QLORA_OPS_DIE_WITH_PARENT"  # set by `qlora-ops run`; inherited by everything it starts


def die_with_parent_if_tied() -> None:
    """For our own entry points (python -m qlora_ops.tasks.data / tasks.train.loop) when a `qlora-ops run` started them,
    perhaps through DVC: die with the parent too, so a chain CLI -> dvc -> stage never leaves the stage
    running. A user's own `python -m qlora_ops.tasks.train` (nohup, a shell) is left alone."""
    if os.environ.get(TIE_ENV) == "1" and sys.platform.startswith("linux"):
        if os.getppid() == 1:  # the parent is already gone (we were handed to init)
            os._exit(1)
        _die_with(os.getppid())()
