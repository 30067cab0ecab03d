"""The webhook receiver of `serve --follow` (tasks/serving/webhook.py) as an attacker on the network meets
it: a real uvicorn server on 127.0.0.1, raw sockets for what an HTTP client would refuse to send (bad
lengths, slow-loris, oversized and chunked bodies), hypothesis over headers and bodies. Timeouts and caps
are shrunk (module constants) so that each case takes about a second."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_ops.tasks.serving import webhook
from tests.conftest import free_port

SECRET = "hook-secret"
ANSWERS = {200, 202, 400, 401, 408, 413, 503}  # never 500, never a dropped connection with a traceback


def sign(delivery: str, ts: str, body: bytes) -> str:
    mac = hmac.new(SECRET.encode(), delivery.encode() + b"." + ts.encode() + b"." + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def event(version=3, **data) -> bytes:
    d = {"name": "m", "alias": "champion", **({"version": version} if version is not None else {}), **data}
    return json.dumps({"entity": "model_version_alias", "action": "created", "data": d}).encode()


def signed_headers(body: bytes, delivery: str = "d-1") -> dict[str, str]:
    ts = str(int(time.time()))
    return {"X-MLflow-Signature": sign(delivery, ts, body), "X-MLflow-Timestamp": ts, "X-MLflow-Delivery-Id": delivery}


def raw(port: int, head: bytes, body: bytes = b"", timeout: float = 10) -> tuple[int | None, bytes]:
    """(status or None when the server closed without answering, the whole answer) of one raw request."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + body)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    line = got.split(b"\r\n", 1)[0].split()
    return (int(line[1]) if len(line) > 1 and line[1].isdigit() else None), got


def request(port: int, headers: dict, body: bytes, length: str | None = "auto") -> tuple[int | None, bytes]:
    lines = [b"POST / HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    if length == "auto":
        length = str(len(body))
    if length is not None:
        lines.append(b"Content-Length: " + length.encode())
    for k, v in headers.items():
        lines.append(k.encode() + b": " + (v if isinstance(v, bytes) else v.encode("utf-8")))
    return raw(port, b"\r\n".join(lines) + b"\r\n\r\n", body)


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(webhook, "HEADER_TIMEOUT_S", 1)
    monkeypatch.setattr(webhook, "BODY_TIMEOUT_S", 1)
    monkeypatch.setattr(webhook, "MAX_CONNECTIONS", 6)


@pytest.fixture
def receiver(fast, tmp_path):
    jobs = []
    with webhook.Receiver(SECRET, lambda *job: jobs.append(job), port=free_port(),
                          seen_file=tmp_path / "seen.json") as rec:
        rec.jobs = jobs
        yield rec


def test_a_signed_event_is_taken_once_even_across_a_restart(fast, tmp_path):
    body, port = event(), free_port()
    with webhook.Receiver(SECRET, lambda *j: None, port=port, seen_file=tmp_path / "seen.json"):
        assert request(port, signed_headers(body), body)[0] == 202
        assert request(port, signed_headers(body), body)[0] == 200  # MLflow's retry
    with webhook.Receiver(SECRET, lambda *j: None, port=port, seen_file=tmp_path / "seen.json"):
        code, text = request(port, signed_headers(body), body)
        assert code == 200 and b"already received" in text


def test_an_event_without_a_version_is_an_error_and_not_marked_seen(receiver):
    port = receiver.port
    for bad in (event(version=None), event(version="x"), event(version=True), event(version=-2)):
        code, text = request(port, signed_headers(bad, "d-2"), bad)
        assert code == 400 and b"version" in text
    assert "d-2" not in receiver.seen
    good = event(version=4)
    assert request(port, signed_headers(good, "d-2"), good)[0] == 202  # the fixed retry is taken
    deadline = time.time() + 10
    while not receiver.jobs and time.time() < deadline:
        time.sleep(0.05)
    assert receiver.jobs == [("m", "champion", 4)]


@pytest.mark.parametrize("headers,length", [
    ({}, "-1"), ({}, "abc"), ({}, "\u00b2"), ({}, "1e3"),
    ({"X-MLflow-Signature": b"v1,\xc3\xa9t\xc3\xa9"}, "auto"),
    ({"X-MLflow-Timestamp": "9" * 400}, "auto"),
    ({"X-MLflow-Delivery-Id": "x" * 500}, "auto"),
])
def test_every_malformed_header_is_a_400(receiver, headers, length):
    body = event()
    code, text = request(receiver.port, {**signed_headers(body), **headers}, body, length=length)
    assert code == 400, text
    assert b"Traceback" not in text


def test_oversized_bodies_are_cut_on_the_stream(receiver):
    port = receiver.port
    # Declared too large: refused before a byte of body is read.
    assert request(port, {}, b"", length=str(64 << 20))[0] == 413
    # Chunked, no length: cut once 1 MiB has arrived, not after the sender is done.
    head = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n" % 65536 + b"a" * 65536 + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        sent, code = 0, None
        try:
            while sent < (64 << 20):
                s.sendall(chunk)
                sent += 65536
        except OSError:  # the server closed its side: it took no more
            pass
        try:
            code = int(s.recv(4096).split()[1])
        except (OSError, IndexError, ValueError):
            pass
    assert sent < (8 << 20), f"the receiver read {sent} bytes of a body over its cap"
    assert code in (413, None)


def test_slow_loris_headers_and_bodies_are_closed(receiver):
    port = receiver.port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n")  # and never the end of the headers
        t0 = time.time()
        assert s.recv(100) == b""
        assert time.time() - t0 < 5
    t0 = time.time()
    code, _ = raw(port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n", b"{}")  # 98 bytes never come
    assert code == 408 and time.time() - t0 < 5


def test_idle_connections_are_capped(receiver):
    socks = [socket.create_connection(("127.0.0.1", receiver.port), timeout=5) for _ in range(webhook.MAX_CONNECTIONS + 4)]
    try:
        time.sleep(0.3)
        closed = 0
        for s in socks:
            s.settimeout(0.2)
            try:
                closed += s.recv(1) == b""
            except (TimeoutError, ConnectionResetError):
                pass
        assert closed >= 4  # the ones over the cap were closed at once, not held open
    finally:
        for s in socks:
            s.close()


def test_a_stopped_receiver_restarts_without_losing_its_queue(receiver):
    receiver._server.should_exit = True
    receiver._http.join(timeout=10)
    assert not receiver.http_alive()
    receiver.start_http()
    body = event()
    assert request(receiver.port, signed_headers(body, "d-9"), body)[0] == 202


_header = st.one_of(st.none(), st.binary(max_size=60).filter(lambda b: b"\r" not in b and b"\n" not in b),
                    st.text(max_size=60).filter(lambda t: "\r" not in t and "\n" not in t).map(lambda t: t.encode()))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sig=_header, ts=_header, delivery=_header, length=_header, body=st.binary(max_size=300))
def test_fuzzed_headers_and_bodies_get_an_answer_never_a_crash(receiver, sig, ts, delivery, length, body):
    headers = {k: v for k, v in (("X-MLflow-Signature", sig), ("X-MLflow-Timestamp", ts),
                                 ("X-MLflow-Delivery-Id", delivery)) if v is not None}
    code, text = request(receiver.port, headers, body, length=None if length is None else length.decode("latin-1"))
    assert code in ANSWERS | {None}, text  # None: h11 dropped a header it cannot parse
    assert b"Traceback" not in text and code != 500


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                         lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                         max_leaves=20),
       depth=st.integers(0, 3000))
def test_fuzzed_signed_bodies_are_answered_never_crash(receiver, data, depth):
    body = json.dumps({"entity": "model_version_alias", "action": "created", "data": data}).encode()
    body = b"[" * depth + body + b"]" * depth
    code, text = request(receiver.port, signed_headers(body, f"f-{abs(hash(body))}"), body)
    assert code in (200, 202, 400) and code != 500, text
