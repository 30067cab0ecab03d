"""One `qlora-ops run` per workspace at a time (DVC, the data snapshot and the run caches are the workspace's)."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qlora_ops.flows.faults import ServiceUnavailable


class WorkspaceBusy(ServiceUnavailable):
    """Another `qlora-ops run` held the workspace for longer than orchestration.timeouts.workspace."""


def _holder(lock_path: Path) -> str:
    try:
        return lock_path.read_text().split()[0]
    except (OSError, IndexError):
        return "unknown"


@contextmanager
def workspace_run_lock(workspace: Path, wait_s: float, poll_s: float = 0.5) -> Iterator[None]:
    """An exclusive flock on <workspace>/.qlora-ops/run.lock holding the owner's pid. A second run says
    once which pid it waits for and waits up to `wait_s` (a scheduled retrain that starts while the last
    one still runs should follow it, not fail), then refuses, naming that pid. The kernel drops the lock
    when its holder dies, kill -9 included, so a crashed run never blocks the next one."""
    import fcntl

    lock_path = Path(workspace) / ".qlora-ops" / "run.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline, said = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pid = _holder(lock_path)
                if time.monotonic() >= deadline:
                    raise WorkspaceBusy(f"another qlora-ops run (pid {pid}) is using workspace {workspace} "
                                        f"(lock {lock_path}); waited {wait_s:g} s (orchestration.timeouts.workspace). "
                                        "Rerun when it has finished") from None
                if not said:
                    print(f"waiting for run pid {pid} (it holds {lock_path}; up to {wait_s:g} s)", flush=True)
                    said = True
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
