"""Orchestration policy without servers: which faults retry, redaction, fast service checks."""
from __future__ import annotations

import time

import pytest

from qlora_ops.flows.runtime import Rejected, ServiceUnavailable, check_services, is_transient, redact, registry_limit_name
from tests.conftest import free_port


def _mlflow(msg: str, code: str = "INTERNAL_ERROR"):
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2

    return MlflowException(msg, error_code=getattr(databricks_pb2, code))


_MAX_RETRIES = ("API request to http://h/api failed with exception HTTPConnectionPool(host='h', port=5000): "
                "Max retries exceeded with url: /x (Caused by ResponseError('too many 503 error responses'))")


@pytest.mark.parametrize("exc, transient", [
    (ConnectionRefusedError(111, "Connection refused"), True),
    (TimeoutError("read timed out"), True),
    # MLflow's REST layer drops the transport error's chain: its own wrapper is read (the origin is MLflow's)
    (lambda: _mlflow(_MAX_RETRIES), True),
    (lambda: _mlflow("server busy", "TEMPORARILY_UNAVAILABLE"), True),
    (lambda: _mlflow("RESOURCE_ALREADY_EXISTS: model exists", "RESOURCE_ALREADY_EXISTS"), False),
    # the same words from anywhere else are not a network fault: the type and origin decide, not the text
    (RuntimeError(_MAX_RETRIES), False),
    (RuntimeError("upload failed: 502 Bad Gateway"), False),
    (ValueError("bad value 503"), False),
    (KeyError("x"), False),
])
def test_transient_classification(exc, transient):
    exc = exc() if callable(exc) else exc
    assert is_transient(exc) is transient


def test_dvc_error_quoting_a_data_row_is_not_retried():
    """issue 25: a DvcError whose text holds "connection refused" (a data row) was retried as a network fault."""
    from qlora_ops.tasks.data.versioning import DvcError

    assert not is_transient(DvcError("`dvc repro` failed in /w:\ndata.jsonl:3: prompt 'why is the connection "
                                     "refused?' has label 503"))
    try:  # a wrapper raised from a real transport error keeps it as its origin: that one is retried
        raise DvcError("push failed") from ConnectionRefusedError(111, "refused")
    except DvcError as e:
        assert is_transient(e)


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
