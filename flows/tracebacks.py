"""One line for an expected failure: no stack trace of Prefect internals on top of it."""
from __future__ import annotations

from qlora_ops.flows.faults import ServiceUnavailable, StageTimedOut, deterministic_errors, is_transient
from qlora_ops.tasks.data.versioning import DvcError


class _ExpectedFailureFilter:
    """Drops the traceback Prefect's engines attach to a failed flow/task run when the failure is an
    expected one (bad params or data, divergence, a gate refusal, a service down): the CLI prints one
    line naming the key or file:line, and a stack trace of Prefect internals only buries it. Internal
    errors keep their traceback."""

    def filter(self, record) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:

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
