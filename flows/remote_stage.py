"""The parent's hand-off to the GPU pool: run the model stage's deployment, wait, read its result.

A lost worker (Crashed: the worker saw its process die, or the heartbeat automation installed by
`qlora-ops deploy` saw its heartbeats stop) or a transient failure starts it again with backoff; Prefect
never retries a Crashed run by itself. A run past orchestration.timeouts.model_stage is cancelled (the
GPU worker's slot comes back, and nothing writes into the parent's MLflow run after it ends FAILED).
"""
from __future__ import annotations

import json
import time

from qlora_ops.flows.faults import StageTimedOut, backoff, is_transient
from qlora_ops.flows.model_stage import RESULT  # the stage writes it into the parent's MLflow run
from qlora_ops.tasks.core.config import Params

MODEL_STAGE_FLOW = "qlora-model-stage"


class ModelStageFailed(RuntimeError):
    pass


def remote_model_stage(params: Params, run_id: str, args: dict) -> dict:
    """Run the GPU deployment and read its result from the run's artifacts; anything but a lost worker or
    a transient fault ends here with the child's own message."""
    import mlflow
    from prefect.deployments import run_deployment

    name = f"{MODEL_STAGE_FLOW}/{params.orchestration.deployment}"
    delays = backoff(params)
    limit = params.orchestration.timeouts.model_stage
    for attempt in range(len(delays) + 1):
        fr = run_deployment(name, parameters=args, timeout=limit, flow_run_name=f"model-stage-{run_id[:8]}-{attempt + 1}")
        st = fr.state
        if st is not None and st.is_completed():
            return json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{RESULT}"))
        if st is None or not st.is_final():
            ended = cancel_flow_run(fr.id, f"the parent stopped waiting after {limit:g} s (orchestration.timeouts.model_stage)")
            raise StageTimedOut(f"{name} run {fr.id} still {st.name if st else 'without a state'} after {limit:g} s "
                                f"(orchestration.timeouts.model_stage): cancelled it ({ended}); raise that limit, "
                                "or find what hangs")
        msg = f"{name} run {fr.id} ended {st.name}: {st.message or ''}"
        retry = st.is_crashed() or is_transient(RuntimeError(st.message or ""))
        if not retry or attempt == len(delays):
            raise ModelStageFailed(msg)
        print(f"{msg}; starting it again in {delays[attempt]:g} s")
        time.sleep(delays[attempt])
    raise AssertionError("unreachable")


def cancel_flow_run(flow_run_id, why: str, wait_s: float = 120, poll_s: float = 2) -> str:
    """Cancel a flow run the way `prefect flow-run cancel` does (state Cancelling: its worker stops the
    process and reports Cancelled; a run still Scheduled goes straight to Cancelled) and wait up to
    `wait_s` for a final state. A run that does not get there has no live worker to stop it: it is set
    Cancelled by force, so its worker slot and concurrency do not stay taken. Returns its final state's
    name and how it got there."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Cancelling

    with get_client(sync_client=True) as c:
        st = c.read_flow_run(flow_run_id).state
        if st is not None and st.is_final():
            return f"already {st.name}"
        c.set_flow_run_state(flow_run_id, Cancelling(message=why))
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            st = c.read_flow_run(flow_run_id).state
            if st is not None and st.is_final():
                return f"{st.name} by its worker" if st.is_cancelled() else st.name
            time.sleep(poll_s)
        c.set_flow_run_state(flow_run_id, Cancelled(message=f"{why}; no worker stopped it within {wait_s:g} s"),
                             force=True)
        return f"forced to Cancelled: no worker stopped it within {wait_s:g} s"
