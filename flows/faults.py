"""Which faults another try may cure: the fault classes the CLI maps to exit codes, and the retry policy.

Stages (tasks/) know nothing of this: they raise plain exceptions; here we decide that a refused
connection is worth another try and a bad row never is.
"""
from __future__ import annotations

from qlora_ops.tasks.core.config import Params
from qlora_ops.tasks.data.sources import is_network_error


class ServiceUnavailable(RuntimeError):
    """A service the run needs (tracking server, Prefect API) did not answer: exit code 4."""


class Rejected(RuntimeError):
    """A gate refused the candidate (a business outcome, never retried)."""


class StageTimedOut(RuntimeError):
    """A stage outlived its `orchestration.timeouts.<stage>` entry: exit 5, never retried (a hung stage
    must not hold its slot twice). Prefect's own TaskRunTimeoutError names neither the stage nor the key."""


def deterministic_errors() -> tuple[type[BaseException], ...]:
    from qlora_ops.tasks.model.base import BaseModelError
    from qlora_ops.tasks.core.config import ParamsError
    from qlora_ops.tasks.data.prepare import DataError
    from qlora_ops.tasks.model.modeling import DivergenceError
    from qlora_ops.tasks.core.util import DiskFull  # another try fills the same disk

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


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry only what is_transient says another try may cure."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


def backoff(params: Params) -> list[float]:
    o = params.orchestration
    return [o.retry_delay_s * 2 ** i for i in range(o.retries)]
