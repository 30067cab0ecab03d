"""Receive MLflow registry webhooks: when `champion` moves, check the new champion's serving parity and
move `serving` only if it passed (tasks.serving.parity). Whatever serves `serving` learns of it through
`on_serving` (`qlora-ops serve --follow` restarts its scoring server on the new version).

MLflow (>= 3.3, SQL backend) POSTs `model_version_alias.created` events signed the Standard-Webhooks way:
    X-MLflow-Signature: v1,<base64 HMAC-SHA256(secret, "<delivery id>.<timestamp>.<body>")>
    X-MLflow-Timestamp: <unix seconds>      X-MLflow-Delivery-Id: <uuid>
(mlflow/webhooks/delivery.py). The receiver refuses (401) anything unsigned, wrongly signed, or older
than `max_age_s` (a replayed capture), answers 202 at once (MLflow waits 30 s and retries on 5xx) and
runs the check on its own thread, one at a time, each delivery id once.

Served by uvicorn + Starlette (the relay's stack, flows/relay.py; both are dependencies in pyproject.toml),
with limits a hand-written http.server lacked: the body cap enforced on the stream (a missing,
-1 or lying Content-Length, chunked bodies), a header timeout and a body timeout, at most
`MAX_CONNECTIONS` open connections and `MAX_CONCURRENCY` requests in flight (uvicorn answers 503 past it),
400 for every malformed header or body (never a traceback), and the delivery ids already taken kept in a
small file (`seen_file`) so that a restart does not run a retried delivery twice. An event that names no
version is answered 400 and not marked seen (MLflow's retry is not lost). The memory it can hold is bounded
(connections x body cap), so it cannot take `serve --follow`'s scoring server down with it; a receiver
thread that stops anyway is restarted by the follower (flows/cli/serving.py) while the scoring server runs on.
Deployment notes (docs/deploy.md): MLflow refuses to call plain-http and private addresses unless the
tracking server runs with MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https and MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true
(a receiver on the same host or cluster network), and needs MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY set so
that the secret survives a restart. The secret comes from the env var QLORA_OPS_WEBHOOK_SECRET.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import Callable

from qlora_ops.tasks.serving.parity import check, record
from qlora_ops.tasks.serving.server import fetch_model, scoring_server

SIGNATURE, TIMESTAMP, DELIVERY = "X-MLflow-Signature", "X-MLflow-Timestamp", "X-MLflow-Delivery-Id"
SECRET_ENV = "QLORA_OPS_WEBHOOK_SECRET"
EVENT = "model_version_alias.created"
MAX_BODY = 1 << 20        # an alias event is ~300 bytes
MAX_DEPTH = 16            # JSON nesting: MLflow's event is 2 deep; deeper is a parser attack, not MLflow
MAX_CONNECTIONS = 32      # open sockets, idle ones included
MAX_CONCURRENCY = 16      # requests in flight; uvicorn answers 503 past it
HEADER_TIMEOUT_S = 10     # a connection that has not sent its request line and headers by then is closed
BODY_TIMEOUT_S = 10       # a body not complete by then: 408
MAX_SEEN = 1000           # delivery ids remembered (MLflow retries within minutes, not thousands of events later)
_TS = re.compile(r"[0-9]{1,12}")
_DELIVERY = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_SIG = re.compile(r"[A-Za-z0-9+/=, ]{1,1024}")
log = logging.getLogger("qlora_ops.webhook")


class BadRequest(ValueError):
    """A malformed request (answered 400, whatever it is: never a traceback)."""


def header_error(headers) -> str | None:
    """Why the signature headers are malformed (a 400), or None. Missing ones are `signature_error`'s 401."""
    for name, pat in ((SIGNATURE, _SIG), (TIMESTAMP, _TS), (DELIVERY, _DELIVERY)):
        v = headers.get(name)
        if v is not None and not pat.fullmatch(v):
            return f"malformed {name} header"
    return None


def signature_error(secret: str, headers, body: bytes, max_age_s: float = 300, now: float | None = None) -> str | None:
    """None when `body` carries a valid MLflow signature made with `secret`; else why not."""
    sig, ts, delivery = headers.get(SIGNATURE), headers.get(TIMESTAMP), headers.get(DELIVERY)
    if not (sig and ts and delivery):
        return f"unsigned: {SIGNATURE}, {TIMESTAMP} and {DELIVERY} are required"
    if (why := header_error(headers)) is not None:  # non-ASCII, 400-digit timestamps: refused before any arithmetic
        return why
    age = (time.time() if now is None else now) - int(ts)
    if abs(age) > max_age_s:
        return f"timestamp {age:.0f} s off (more than {max_age_s:g} s): a replay or a skewed clock"
    mac = hmac.new(secret.encode(), delivery.encode() + b"." + ts.encode() + b"." + body, hashlib.sha256).digest()
    want = "v1," + base64.b64encode(mac).decode()
    if not any(hmac.compare_digest(want, s.strip()) for s in sig.split(" ")):
        return "signature does not match"
    return None


def content_length(headers) -> int | None:
    """The declared body length; None when there is none (chunked). BadRequest for anything but ASCII digits
    (`-1`, `²`, `1e3`, several values)."""
    v = headers.get("content-length")
    if v is None:
        return None
    if not (v.isascii() and v.isdigit()) or len(v) > 12:
        raise BadRequest("malformed Content-Length")
    return int(v)


def json_depth_ok(body: bytes, max_depth: int = MAX_DEPTH) -> bool:
    """True when the JSON text nests at most `max_depth` arrays/objects (checked before json.loads, whose
    recursion a deep body would exhaust). Strings are skipped: brackets inside them do not count."""
    depth = 0
    for m in re.finditer(rb'"(?:[^"\\]|\\.)*"|[\[{]|[\]}]', body):
        c = m.group()[:1]
        if c in b"[{":
            depth += 1
            if depth > max_depth:
                return False
        elif c in b"]}":
            depth -= 1
    return True


def parse_event(body: bytes) -> dict:
    """The JSON object of a webhook body; BadRequest when it is not one (or nests too deep)."""
    if not json_depth_ok(body):
        raise BadRequest(f"body nests deeper than {MAX_DEPTH}")
    try:
        event = json.loads(body)
    except (ValueError, RecursionError):
        raise BadRequest("body is not JSON") from None
    if not isinstance(event, dict):
        raise BadRequest("body is not a JSON object")
    return event


def alias_job(event: dict) -> tuple[str, str, int]:
    """(model name, alias, version) of an alias event; BadRequest when one is missing or malformed."""
    d = event.get("data")
    if not isinstance(d, dict):
        raise BadRequest("event without data")
    name, alias, version = d.get("name"), d.get("alias"), d.get("version")
    if not (isinstance(name, str) and name and isinstance(alias, str) and alias):
        raise BadRequest("event without a model name and alias")
    if isinstance(version, str) and version.isascii() and version.isdigit() and len(version) <= 9:
        version = int(version)
    if isinstance(version, bool) or not isinstance(version, int) or not 0 < version < 10**9:
        raise BadRequest("event without a valid version")
    return name, alias, version


class SeenIds:
    """Delivery ids already taken, the last `MAX_SEEN`, kept in a JSON file (written whole, then renamed)."""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path else None
        self.ids: list[str] = []
        if self.path and self.path.is_file():
            try:
                ids = json.loads(self.path.read_text())
                self.ids = [str(i) for i in ids][-MAX_SEEN:] if isinstance(ids, list) else []
            except (ValueError, OSError):
                log.warning("webhook: %s unreadable; starting with no delivery ids seen", self.path)
        self._lock = threading.Lock()

    def __contains__(self, delivery: str) -> bool:
        return delivery in self.ids

    def add(self, delivery: str) -> None:
        with self._lock:
            self.ids = (self.ids + [delivery])[-MAX_SEEN:]
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(self.ids))
                os.replace(tmp, self.path)


def _protocol_class():
    """uvicorn's h11 protocol plus what it lacks: a header timeout (slow-loris) and a connection cap."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class LimitedH11(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            if len(self.connections) > MAX_CONNECTIONS:
                transport.close()
                return
            self._header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_late)

        def _headers_late(self) -> None:
            if self.cycle is None:  # no request line and headers yet (the keep-alive timer covers later ones)
                self.transport.close()

        def connection_lost(self, exc):
            if (t := getattr(self, "_header_timer", None)) is not None:
                t.cancel()
            super().connection_lost(exc)

    return LimitedH11


def create_app(rec: "Receiver"):
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    def reply(code: int, text: str):
        # On a refusal the connection is closed: whatever body is still coming is not read on.
        return PlainTextResponse(text + "\n", status_code=code, headers={"Connection": "close"} if code >= 400 else None)

    async def read_body(request) -> bytes:
        n = content_length(request.headers)
        if n is not None and n > MAX_BODY:
            raise OverflowError
        body = bytearray()
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY:  # a lying length or a chunked body: cut on the stream
                    raise OverflowError
        return bytes(body)

    async def hook(request):
        try:
            if (why := header_error(request.headers)) is not None:
                return reply(400, why)
            body = await read_body(request)
            if (why := signature_error(rec.secret, request.headers, body, rec.max_age_s)) is not None:
                return reply(401, why)
            event = parse_event(body)
            if f"{event.get('entity')}.{event.get('action')}" != EVENT:
                return reply(200, "ignored: not a model_version_alias.created event")
            job = alias_job(event)  # before marking it seen: a malformed event is not taken
            delivery = request.headers[DELIVERY]
            if delivery in rec.seen:  # MLflow retries a delivery it thinks failed: once is enough
                return reply(200, "already received")
            rec.seen.add(delivery)
            rec._jobs.put(job)
            return reply(202, "accepted")
        except BadRequest as e:
            return reply(400, str(e))
        except OverflowError:
            return reply(413, "body too large")
        except TimeoutError:
            return reply(408, "body not received in time")
        except ClientDisconnect:
            return reply(400, "client went away")
        except Exception as e:  # noqa: BLE001 (one line, no traceback: nothing an outsider sends may crash it)
            log.error("webhook: %s", type(e).__name__)
            return reply(500, "internal error")

    return Starlette(routes=[Route("/", hook, methods=["POST"])])


class Receiver:
    """A webhook endpoint on host:port (a uvicorn thread) that hands each verified alias event to `handler`.

    `handler(name, alias, version) -> dict | None` runs on one worker thread, events in order; its results
    are in `handled`, its failures in `errors`. `seen_file` keeps the delivery ids taken across restarts.
    """

    def __init__(self, secret: str, handler: Callable[[str, str, int], dict | None], port: int,
                 host: str = "127.0.0.1", max_age_s: float = 300, seen_file: Path | None = None):
        if not secret:
            raise ValueError(f"a webhook secret is required ({SECRET_ENV}): an unsigned receiver would let anyone "
                             "who reaches it trigger checks and alias moves")
        self.secret, self.handler, self.max_age_s = secret, handler, max_age_s
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}/"
        self.handled: list[dict] = []
        self.errors: list[str] = []
        self.seen = SeenIds(seen_file)
        self._jobs: queue.Queue = queue.Queue()
        self._server = None
        self._http: threading.Thread | None = None
        self._worker = threading.Thread(target=self._work, daemon=True, name="webhook-worker")

    def start_http(self) -> None:
        """(Re)start the HTTP side; the worker and its queue are untouched."""
        import uvicorn

        cfg = uvicorn.Config(create_app(self), host=self.host, port=self.port, http=_protocol_class(),
                             access_log=False, server_header=False, proxy_headers=False, log_level="warning",
                             timeout_keep_alive=5, limit_concurrency=MAX_CONCURRENCY, lifespan="off",
                             h11_max_incomplete_event_size=16 * 1024)
        self._server = uvicorn.Server(cfg)
        self._http = threading.Thread(target=self._server.run, daemon=True, name="webhook-http")
        self._http.start()
        deadline = time.time() + 30
        while not self._server.started:
            if not self._http.is_alive() or time.time() > deadline:
                raise OSError(f"the webhook receiver could not listen on {self.host}:{self.port}")
            time.sleep(0.05)

    def http_alive(self) -> bool:
        return self._http is not None and self._http.is_alive()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if (res := self.handler(*job)) is not None:
                    self.handled.append(res)
            except Exception as e:  # one bad event must not stop the receiver
                self.errors.append(f"{job}: {type(e).__name__}: {e}")

    def __enter__(self) -> "Receiver":
        self.start_http()
        self._worker.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._http is not None:
            self._http.join(timeout=30)
        self._jobs.put(None)
        self._worker.join(timeout=600)


def champion_checker(model_name: str, champion_alias: str, *, threshold: float, confidence: float, work: Path,
                     serving_alias: str = "serving", on_serving: Callable[[int, Path, str], None] | None = None,
                     writer: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                     lock_path: Path | None = None):
    """The handler for a Receiver: on `champion_alias` moving to a version of `model_name`, serve that
    version on a scoring server of its own (127.0.0.1, a free port), check its parity, record the result
    (tags; `serving_alias` moves only on a pass), then call `on_serving(version, model_dir, digest)`.
    The record runs inside `writer()` (the registered model's one slot, flows.registry_slot, as every other
    registry writer) and the workspace's `lock_path`, re-reading the champion there; the check before it
    holds neither (it replays the test rows: minutes)."""
    import socket

    def handle(name: str, alias: str, version: int) -> dict | None:
        if name != model_name or alias != champion_alias:
            return None
        local, digest = fetch_model(name, version, Path(work) / f"v{version}")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with scoring_server(local, digest, port) as url:
            res = check(url, name, version, threshold, confidence, Path(work) / f"check-v{version}")
        with writer():  # moves only if still champion, read under the slot
            res = record(res, serving_alias, champion_alias=champion_alias, lock_path=lock_path)
        if res["alias_moved"] and on_serving is not None:
            on_serving(version, local, digest)
        return res
    return handle


def ensure_webhook(client, url: str, secret: str, model_name: str):
    """The MLflow webhook calling `url` on `model_version_alias.created` (created, or updated in place)."""
    hook_name = f"qlora-ops-serving-{model_name}"[:63]
    token = None
    while True:
        page = client.list_webhooks(max_results=100, page_token=token)
        for hook in page:
            if hook.name == hook_name:
                return client.update_webhook(hook.webhook_id, url=url, events=[EVENT], secret=secret, status="ACTIVE")
        if not (token := page.token):
            break
    return client.create_webhook(name=hook_name, url=url, events=[EVENT], secret=secret,
                                 description=f"qlora-ops: serving parity check when {model_name}'s champion moves")
