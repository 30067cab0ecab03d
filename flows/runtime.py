"""Orchestration policy, in one place: which faults retry, each stage's timeout and retries from
params, the registry's cross-machine promotion slot, and a fast check that the services answer.

Stages (tasks/) know nothing of this: they raise plain exceptions; here we decide that a refused
connection is worth another try and a bad row never is.
"""
from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Iterator

from tasks.config import Params
from tasks.memory import PeakMemory
from tasks.sources import is_network_error, redact_url as redact


class ServiceUnavailable(RuntimeError):
    """A service the run needs (tracking server, Prefect API) did not answer: exit code 4."""


class Rejected(RuntimeError):
    """A gate refused the candidate (a business outcome, never retried)."""


def deterministic_errors() -> tuple[type[BaseException], ...]:
    from tasks.base_model import BaseModelError
    from tasks.config import ParamsError
    from tasks.data import DataError
    from tasks.modeling import DivergenceError

    return ParamsError, DataError, BaseModelError, DivergenceError, Rejected


def is_transient(exc: BaseException) -> bool:
    """True for faults another try may cure (network, 5xx, a lost connection); False for bad data,
    bad params, divergence, a gate refusal, and for timeouts (a hung stage must not hold its slot twice)."""
    from prefect.flow_engine import FlowRunTimeoutError
    from prefect.task_engine import TaskRunTimeoutError

    if isinstance(exc, deterministic_errors() + (TaskRunTimeoutError, FlowRunTimeoutError)):
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
    """`task` with its timeout (params.orchestration.timeouts.<timeout>) and transient-only retries."""
    o = params.orchestration
    return task.with_options(timeout_seconds=getattr(o.timeouts, timeout), retries=o.retries,
                             retry_delay_seconds=backoff(params) or 0, retry_condition_fn=_retry_if_transient)


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

            if isinstance(exc, deterministic_errors() + (ServiceUnavailable, DvcError)) or is_transient(exc):
                record.exc_info, record.exc_text = None, None
        return True


def quiet_expected_tracebacks() -> None:
    """Entry points only (no import-time side effects): install the filter on Prefect's run loggers."""
    import logging

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _ExpectedFailureFilter) for f in lg.filters):
            lg.addFilter(_ExpectedFailureFilter())
