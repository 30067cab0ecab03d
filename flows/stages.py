"""A Prefect task as one stage of the loop: its timeout from params and transient-only retries."""
from __future__ import annotations

from qlora_ops.flows.faults import StageTimedOut, backoff, retry_if_transient
from qlora_ops.tasks.core.config import Params


def stage(task, params: Params, timeout: str):
    """`task` with its timeout (params.orchestration.timeouts.<timeout>) and transient-only retries; a
    timeout comes back as StageTimedOut naming the stage and the params key to change."""
    from prefect.task_engine import TaskRunTimeoutError

    o = params.orchestration
    limit = getattr(o.timeouts, timeout)
    t = task.with_options(timeout_seconds=limit, retries=o.retries,
                          retry_delay_seconds=backoff(params) or 0, retry_condition_fn=retry_if_transient)

    def run(*a, **k):
        try:
            return t(*a, **k)
        except TaskRunTimeoutError as e:
            raise StageTimedOut(f"stage {task.name} did not finish within {limit:g} s "
                                f"(orchestration.timeouts.{timeout}); raise that limit, or find what hangs") from e
    return run
