"""The laptop's temporary Prefect API server: started by `qlora-ops run` when PREFECT_API_URL is unset,
as our child, so that it dies with us (even on kill -9)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qlora_ops.flows.faults import ServiceUnavailable
from qlora_ops.flows.services import probe
from qlora_ops.tasks.core.util import popen_child

# Set (to its URL) while a temporary server runs; inherited by every process we start, so a child can
# tell that PREFECT_API_URL points at a server nobody else talks to (flows.registry_slot refuses it).
TEMPORARY_API_ENV = "QLORA_OPS_TEMPORARY_PREFECT_API"


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


def is_temporary(api_url: str | None) -> bool:
    """True if `api_url` is a temporary server of this CLI (this process's, or the one of the `qlora-ops
    run` that started us): nobody else serializes on it."""
    return bool(api_url) and (api_url in _servers or os.environ.get(TEMPORARY_API_ENV) == api_url)


@contextmanager
def temporary_prefect_server(timeout: float | None = None) -> Iterator[str | None]:
    """With PREFECT_API_URL unset, start the temporary API server Prefect would start by itself
    (prefect.server.api.server.SubprocessASGIServer: the same uvicorn command and settings), but as our
    child with PR_SET_PDEATHSIG (tasks.core.util.popen_child): a `kill -9` of the CLI takes it down too,
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
    os.environ["PREFECT_API_URL"] = os.environ[TEMPORARY_API_ENV] = server.url
    _servers[server.url] = server
    try:
        yield server.url
    finally:
        _drain_prefect_clients()  # logs and events still queued for the server, while it is up
        os.environ.pop("PREFECT_API_URL", None)
        os.environ.pop(TEMPORARY_API_ENV, None)
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
        if probe(url.rstrip("/") + "/health", 2) is None:
            return
        time.sleep(0.1)
    raise ServiceUnavailable(f"the temporary Prefect server at {url} did not answer within {server.timeout:g} s")
