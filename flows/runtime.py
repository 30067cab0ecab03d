"""Orchestration policy, in one place: which faults retry, each stage's timeout and retries from
params, the registry's cross-machine promotion slot, and a fast check that the services answer.

Stages (tasks/) know nothing of this: they raise plain exceptions; here we decide that a refused
connection is worth another try and a bad row never is.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tasks.config import Params
from tasks.memory import PeakMemory
from tasks.sources import is_network_error, redact_url as redact


class ServiceUnavailable(RuntimeError):
    """A service the run needs (tracking server, Prefect API) did not answer: exit code 4."""


class Rejected(RuntimeError):
    """A gate refused the candidate (a business outcome, never retried)."""


class StageTimedOut(RuntimeError):
    """A stage outlived its `orchestration.timeouts.<stage>` entry: exit 5, never retried (a hung stage
    must not hold its slot twice). Prefect's own TaskRunTimeoutError names neither the stage nor the key."""


def deterministic_errors() -> tuple[type[BaseException], ...]:
    from tasks.base_model import BaseModelError
    from tasks.config import ParamsError
    from tasks.data import DataError
    from tasks.modeling import DivergenceError
    from tasks.util import DiskFull  # another try fills the same disk

    return ParamsError, DataError, BaseModelError, DivergenceError, Rejected, DiskFull


def is_transient(exc: BaseException) -> bool:
    """True for faults another try may cure (network, 5xx, a lost connection); False for bad data,
    bad params, divergence, a gate refusal, and for timeouts (a hung stage must not hold its slot twice)."""
    from prefect.flow_engine import FlowRunTimeoutError
    from prefect.task_engine import TaskRunTimeoutError

    if isinstance(exc, deterministic_errors() + (StageTimedOut, TaskRunTimeoutError, FlowRunTimeoutError)):
        return False
    import httpx  # Prefect's client: a dropped read/write is a network fault whatever its class name says

    return isinstance(exc, httpx.TransportError) or is_network_error(exc)


def _retry_if_transient(task, task_run, state) -> bool:
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


def backoff(params: Params) -> list[float]:
    o = params.orchestration
    return [o.retry_delay_s * 2 ** i for i in range(o.retries)]


def stage(task, params: Params, timeout: str):
    """`task` with its timeout (params.orchestration.timeouts.<timeout>) and transient-only retries; a
    timeout comes back as StageTimedOut naming the stage and the params key to change."""
    from prefect.task_engine import TaskRunTimeoutError

    o = params.orchestration
    limit = getattr(o.timeouts, timeout)
    t = task.with_options(timeout_seconds=limit, retries=o.retries,
                          retry_delay_seconds=backoff(params) or 0, retry_condition_fn=_retry_if_transient)

    def run(*a, **k):
        try:
            return t(*a, **k)
        except TaskRunTimeoutError as e:
            raise StageTimedOut(f"stage {task.name} did not finish within {limit:g} s "
                                f"(orchestration.timeouts.{timeout}); raise that limit, or find what hangs") from e
    return run


class StageTimer:
    """`timer("train_qlora", fn, *a)` runs fn and records its wall seconds in `timer.seconds` and its
    peak memory in `timer.peak_mb` (MiB, measured from the stage's own start: tasks.memory)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}

    def __call__(self, name: str, fn, *a, **k):
        # One line at the start and one at the end of each stage (printed: inside a flow, log_prints
        # sends it to the run's log as well as the console).
        print(f"{time.strftime('%H:%M:%S')} {name} ...", flush=True)
        t = time.time()
        ok = False
        pm = PeakMemory()
        try:
            with pm:
                out = fn(*a, **k)
            ok = True
            return out
        finally:
            self.seconds[name] = round(time.time() - t, 1)
            self.peak_mb[name] = pm.peak_mb
            print(f"{time.strftime('%H:%M:%S')} {name} {'done in' if ok else 'failed after'} {self.seconds[name]:.1f} s",
                  flush=True)


# ---------------------------------------------------------------- one promotion at a time
def registry_limit_name(model_name: str) -> str:
    return "qlora-ops-registry-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", model_name)


def ensure_registry_limit(model_name: str) -> str:
    """Create the model's global concurrency limit (1 slot) if missing; Prefect requires limits to exist."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = registry_limit_name(model_name)
    with get_client(sync_client=True) as c:
        try:
            c.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                c.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass  # another run created it between our read and write
    return name


@contextmanager
def registry_slot(model_name: str, timeout_s: float) -> Iterator[None]:
    """Hold the registered model's Prefect global concurrency slot: every deployment, worker and laptop
    that talks to the same Prefect API serializes register + promote here (the fcntl lock in
    tasks.register covers runs that share only a filesystem)."""
    from prefect.concurrency.sync import concurrency

    if os.environ.get("PREFECT_API_URL") in _servers:
        # The CLI's own temporary server: nobody else talks to it, and its leases live in its memory
        # (no repossessor in an ephemeral server), so a slot taken by a run killed with -9 would stay
        # taken in the shared database and block every later run. The workspace's file lock serializes.
        yield
        return
    name = ensure_registry_limit(model_name)
    with concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True):
        yield


# ---------------------------------------------------------------- services answer, fast
def _probe(url: str, timeout: float) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return None if r.status < 500 else f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return None if e.code < 500 else f"HTTP {e.code}"  # 401/403/404: something answered
    except (OSError, ValueError) as e:
        return str(getattr(e, "reason", e))


def check_services(tracking_uri: str, prefect_api: str | None, timeout: float = 5.0) -> None:
    """Seconds, not minutes: MLflow's client would retry a dead server for over 4 minutes."""
    checks = []
    if tracking_uri.startswith(("http://", "https://")):
        checks.append(("MLflow tracking server", tracking_uri, tracking_uri.rstrip("/") + "/health"))
    if prefect_api:
        checks.append(("Prefect API", prefect_api, prefect_api.rstrip("/") + "/health"))
    for what, shown, url in checks:
        if (err := _probe(url, timeout)) is not None:
            raise ServiceUnavailable(f"{what} at {redact(shown)} did not answer within {timeout:g} s ({err}); "
                                     "start it or fix the URI, then rerun")


# ---------------------------------------------------------------- one line for an expected failure
class _ExpectedFailureFilter:
    """Drops the traceback Prefect's engines attach to a failed flow/task run when the failure is an
    expected one (bad params or data, divergence, a gate refusal, a service down): the CLI prints one
    line naming the key or file:line, and a stack trace of Prefect internals only buries it. Internal
    errors keep their traceback."""

    def filter(self, record) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            from tasks.versioning import DvcError

            if isinstance(exc, deterministic_errors() + (ServiceUnavailable, StageTimedOut, DvcError)) \
                    or is_transient(exc):
                record.exc_info, record.exc_text = None, None
        return True


def quiet_expected_tracebacks() -> None:
    """Entry points only (no import-time side effects): install the filter on Prefect's run loggers."""
    import logging

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _ExpectedFailureFilter) for f in lg.filters):
            lg.addFilter(_ExpectedFailureFilter())


# ---------------------------------------------------------------- the laptop's temporary Prefect server
class _Server:
    """A temporary uvicorn Prefect API on `port`, our child (PR_SET_PDEATHSIG), stderr in a file (a pipe
    nobody reads would block it)."""

    def __init__(self, port: int, timeout: float):
        import importlib.util
        import tempfile

        self.port, self.timeout, self.url = port, timeout, f"http://127.0.0.1:{port}/api"
        self.err = tempfile.TemporaryFile()
        app_dir = Path(importlib.util.find_spec("prefect").origin).parent.parent  # no `import prefect` yet
        self.args = [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
                     "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
                     "--log-level", "error", "--lifespan", "on"]
        self.start()

    def start(self) -> None:
        from tasks.util import popen_child

        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        self.proc = popen_child(self.args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=self.err)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.err.close()


_servers: dict[str, _Server] = {}


@contextmanager
def temporary_prefect_server(timeout: float | None = None) -> Iterator[str | None]:
    """With PREFECT_API_URL unset, start the temporary API server Prefect would start by itself
    (prefect.server.api.server.SubprocessASGIServer: the same uvicorn command and settings), but as our
    child with PR_SET_PDEATHSIG (tasks.util.popen_child): a `kill -9` of the CLI takes it down too,
    where Prefect's own is left running as an orphan. PREFECT_API_URL points at it before Prefect is
    imported, so this process and every child it starts use it. Yields the API URL (None: one was set).
    The caller imports what it needs meanwhile; wait_prefect_server() waits for it to answer."""
    if os.environ.get("PREFECT_API_URL"):
        yield None
        return
    # Prefect's own setting for its temporary server, if set; else longer than its 20 s: a loaded
    # 2-core machine takes that long to import and migrate.
    timeout = timeout or float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 90))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = _Server(port, timeout)
    os.environ["PREFECT_API_URL"] = server.url
    _servers[server.url] = server
    try:
        yield server.url
    finally:
        _drain_prefect_clients()  # logs and events still queued for the server, while it is up
        os.environ.pop("PREFECT_API_URL", None)
        _servers.pop(server.url, None)
        server.stop()


def _drain_prefect_clients(timeout: float = 30) -> None:
    """Prefect ships run logs and events from background workers that it drains at interpreter exit;
    by then our server is stopped ("Error logging to API"). Drain them now."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        service.drain_all(timeout=timeout, at_exit=False)


def wait_prefect_server(url: str | None, attempts: int = 3) -> None:
    """Block until the temporary server at `url` answers /health. A server that exits while starting is
    started again on the same port (the URL is already in Prefect's settings), as Prefect does: two runs
    starting at once on one PREFECT_HOME race for its SQLite database while migrating. ServiceUnavailable
    after `attempts` exits, or after its timeout."""
    if url is None or url not in _servers:
        return
    server = _servers[url]
    deadline = time.monotonic() + server.timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            attempts -= 1
            if attempts <= 0:
                server.err.seek(0)
                raise ServiceUnavailable(f"the temporary Prefect server exited with {server.proc.returncode}: "
                                         f"{server.err.read().decode(errors='replace')[-2000:]}")
            time.sleep(1)
            server.start()
            continue
        if _probe(url.rstrip("/") + "/health", 2) is None:
            return
        time.sleep(0.1)
    raise ServiceUnavailable(f"the temporary Prefect server at {url} did not answer within {server.timeout:g} s")


# ---------------------------------------------------------------- one run per workspace
class WorkspaceBusy(ServiceUnavailable):
    """Another `qlora-ops run` held the workspace for longer than orchestration.timeouts.workspace."""


def _holder(lock_path: Path) -> str:
    try:
        return lock_path.read_text().split()[0]
    except (OSError, IndexError):
        return "unknown"


@contextmanager
def workspace_run_lock(workspace: Path, wait_s: float, poll_s: float = 0.5) -> Iterator[None]:
    """One `qlora-ops run` per workspace at a time (DVC, the data snapshot and the run caches are the
    workspace's): an exclusive flock on <workspace>/.qlora-ops/run.lock holding the owner's pid. A second
    run says once which pid it waits for and waits up to `wait_s` (a scheduled retrain that starts while
    the last one still runs should follow it, not fail), then refuses, naming that pid. The kernel drops
    the lock when its holder dies, kill -9 included, so a crashed run never blocks the next one."""
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
