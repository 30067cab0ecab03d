"""Orchestration policy without servers: which faults retry, redaction, fast service checks."""
from __future__ import annotations

import time

import pytest

from qlora_ops.flows.runtime import Rejected, ServiceUnavailable, check_services, is_transient, redact, registry_limit_name
from tests.conftest import free_port


@pytest.mark.parametrize("exc, transient", [
    (ConnectionRefusedError(111, "Connection refused"), True),
    (TimeoutError("read timed out"), True),
    (RuntimeError("API request to http://h/api failed with exception HTTPConnectionPool(host='h', port=5000): "
                  "Max retries exceeded with url: /x (Caused by ResponseError('too many 503 error responses'))"), True),
    (RuntimeError("upload failed: 502 Bad Gateway"), True),
    (RuntimeError("RESOURCE_ALREADY_EXISTS: model exists"), False),
    (ValueError("bad value 503"), True),  # the text decides for wrapped errors: a 5xx status is a 5xx status
    (KeyError("x"), False),
])
def test_transient_classification(exc, transient):
    assert is_transient(exc) is transient


def test_client_library_network_errors_are_transient():
    import httpx
    import requests

    for exc in (requests.ConnectionError("boom"), requests.Timeout("slow"), httpx.ReadError("dropped"),
                httpx.ConnectError("refused")):
        assert is_transient(exc), exc


def test_deterministic_faults_never_retry_even_with_network_words():
    from prefect.task_engine import TaskRunTimeoutError

    from qlora_ops.tasks.core.config import ParamsError
    from qlora_ops.tasks.data.prepare import DataError
    from qlora_ops.tasks.model.modeling import DivergenceError

    for exc in (ParamsError("connection refused in key x"), DataError("f.jsonl:3: timed out?"),
                DivergenceError("loss nan"), Rejected("gain_over_base 503"), TaskRunTimeoutError("timed out")):
        assert not is_transient(exc), exc


def test_redact_hides_passwords_only():
    assert redact("http://alice:s3cret@mlflow:5000") == "http://alice:***@mlflow:5000"
    assert redact("http://mlflow:5000/path") == "http://mlflow:5000/path"


def test_dead_tracking_server_is_named_in_seconds():
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t = time.time()
    with pytest.raises(ServiceUnavailable, match=f"MLflow tracking server at {uri}"):
        check_services(uri, None, timeout=2)
    assert time.time() - t < 5
    check_services("sqlite:///x.db", None)  # a local store needs no server


def test_limit_name_is_a_valid_prefect_name():
    assert registry_limit_name("team/model v1") == "qlora-ops-registry-team-model-v1"
