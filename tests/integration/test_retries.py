"""Retries and timeouts as params set them, on the real Prefect engine: a transient fault is retried
and the stage succeeds; bad data, a gate refusal and a timeout are not retried."""
from __future__ import annotations

import time

import pytest

from qlora_ops.flows.runtime import Rejected, stage
from qlora_ops.tasks.core.config import Params
from tests.conftest import start_prefect_server


@pytest.fixture(scope="module")
def prefect(tmp_path_factory):
    with start_prefect_server(tmp_path_factory.mktemp("prefect-retries") / "home") as server:
        with server.settings():
            yield server


def _params(**orch) -> Params:
    return Params(orchestration={"retries": 2, "retry_delay_s": 0, **orch})


def _run(exc_factory, fail_times: int, **orch):
    from prefect import flow, task

    calls = []

    @task(persist_result=False)
    def flaky():
        calls.append(time.time())
        if len(calls) <= fail_times:
            raise exc_factory()
        return "ok"

    @flow(persist_result=False)
    def f():
        return stage(flaky, _params(**orch), "evaluate")()

    state = f(return_state=True)
    return state, calls


def test_transient_fault_is_retried_and_succeeds(prefect):
    state, calls = _run(lambda: ConnectionResetError(104, "Connection reset by peer"), fail_times=1)
    assert state.is_completed() and state.result() == "ok" and len(calls) == 2


def test_retries_are_bounded(prefect):
    state, calls = _run(lambda: ConnectionRefusedError(111, "Connection refused"), fail_times=99)
    assert state.is_failed() and len(calls) == 3  # 1 + orchestration.retries


@pytest.mark.parametrize("make", [lambda: Rejected("gain_over_base FAIL"),
                                  lambda: __import__("qlora_ops.tasks.data.prepare", fromlist=["DataError"]).DataError("f.jsonl:2: bad"),
                                  lambda: __import__("qlora_ops.tasks.core.config", fromlist=["ParamsError"]).ParamsError("x: bad")])
def test_deterministic_fault_is_not_retried(prefect, make):
    state, calls = _run(make, fail_times=99)
    assert state.is_failed() and len(calls) == 1


# method="thread": pytest-timeout's default SIGALRM would take the alarm Prefect's timeout relies on.
@pytest.mark.timeout(120, method="thread")
def test_stage_timeout_from_params_stops_a_hung_stage(prefect):
    from prefect import flow, task

    @task(persist_result=False)
    def hang():
        time.sleep(30)

    @flow(persist_result=False)
    def f():
        return stage(hang, Params(orchestration={"timeouts": {"evaluate": 1}}), "evaluate")()

    t = time.time()
    state = f(return_state=True)
    assert state.is_failed() and time.time() - t < 15  # stopped, and the timeout is not retried
