"""Which faults another try may cure: the fault classes the CLI maps to exit codes, and the retry policy.

Stages (tasks/) know nothing of this: they raise plain exceptions; here we decide that a refused
connection is worth another try and a bad row never is.
"""
from __future__ import annotations

import re

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


# Exception classes that are network faults by origin: the client libraries' own transport errors. A class
# is looked up by module and name so that a library that is not installed costs nothing.
_NETWORK_TYPES = (("httpx", "TransportError"), ("requests.exceptions", "ConnectionError"),
                  ("requests.exceptions", "Timeout"), ("urllib3.exceptions", "ProtocolError"),
                  ("urllib3.exceptions", "MaxRetryError"), ("urllib3.exceptions", "TimeoutError"),
                  ("botocore.exceptions", "ConnectionError"), ("botocore.exceptions", "ReadTimeoutError"),
                  ("aiohttp", "ClientConnectionError"), ("aiohttp", "ServerTimeoutError"))
# MLflow error codes a server sends for a fault another try may cure (503, 504, 429)
_MLFLOW_RETRY_CODES = ("TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED", "REQUEST_LIMIT_EXCEEDED")
# MLflow's REST layer wraps a transport error without chaining it: its message is the only record left,
# so only a message that this origin wrote ("API request to <url> failed with ...") is read.
_MLFLOW_REST = re.compile(r"^API request to \S+ failed with (timeout )?exception")


def _network_types() -> tuple[type, ...]:
    import importlib

    out = [ConnectionError, TimeoutError]  # builtins: socket errors, our own "service did not answer"
    for mod, name in _NETWORK_TYPES:
        try:
            out.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            pass
    return tuple(out)


def _chain(exc: BaseException):
    """exc, then what it was raised from or during (a wrapper keeps its origin in __cause__)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)


def _mlflow_transient(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    return exc.error_code in _MLFLOW_RETRY_CODES or \
        (bool(_MLFLOW_REST.match(str(exc.message))) and is_network_error(exc))


def is_transient(exc: BaseException) -> bool:
    """True for faults another try may cure, told by the exception's type and origin, never by its text
    alone: a network library's transport error (or a wrapper raised from one), a 503/504/429 from the
    tracking server, MLflow's REST layer reporting a transport failure. False for bad data, bad params,
    divergence, a gate refusal, and for timeouts (a hung stage must not hold its slot twice): a DvcError
    or DataError whose text quotes "connection refused" from a data row is not a network fault."""
    from prefect.flow_engine import FlowRunTimeoutError
    from prefect.task_engine import TaskRunTimeoutError

    if isinstance(exc, deterministic_errors() + (StageTimedOut, TaskRunTimeoutError, FlowRunTimeoutError)):
        return False
    net = _network_types()
    return any(isinstance(e, net) or _mlflow_transient(e) for e in _chain(exc))


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry only what is_transient says another try may cure."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


def backoff(params: Params) -> list[float]:
    o = params.orchestration
    return [o.retry_delay_s * 2 ** i for i in range(o.retries)]
