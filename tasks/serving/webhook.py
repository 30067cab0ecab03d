"""Receive MLflow registry webhooks: when `champion` moves, check the new champion's serving parity and
move `serving` only if it passed (tasks.serving.parity). Whatever serves `serving` learns of it through
`on_serving` (`qlora-ops serve --follow` restarts its scoring server on the new version).

MLflow (>= 3.3, SQL backend) POSTs `model_version_alias.created` events signed the Standard-Webhooks way:
    X-MLflow-Signature: v1,<base64 HMAC-SHA256(secret, "<delivery id>.<timestamp>.<body>")>
    X-MLflow-Timestamp: <unix seconds>      X-MLflow-Delivery-Id: <uuid>
(mlflow/webhooks/delivery.py). The receiver refuses (401) anything unsigned, wrongly signed, or older
than `max_age_s` (a replayed capture), answers 202 at once (MLflow waits 30 s and retries on 5xx) and
runs the check on its own thread, one at a time, each delivery id once.

Written by hand on the stdlib http.server: MLflow ships the sender and the signature scheme, not a
receiver; the verification is 10 lines and must not pull a web framework into the serving side.
Deployment notes (docs/deploy.md): MLflow refuses to call plain-http and private addresses unless the
tracking server runs with MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https and MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true
(a receiver on the same host or cluster network), and needs MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY set so
that the secret survives a restart. The secret comes from the env var QLORA_OPS_WEBHOOK_SECRET.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

from qlora_ops.tasks.serving.parity import verify_serving
from qlora_ops.tasks.serving.server import fetch_model, scoring_server

SIGNATURE, TIMESTAMP, DELIVERY = "X-MLflow-Signature", "X-MLflow-Timestamp", "X-MLflow-Delivery-Id"
SECRET_ENV = "QLORA_OPS_WEBHOOK_SECRET"
EVENT = "model_version_alias.created"
MAX_BODY = 1 << 20


def signature_error(secret: str, headers, body: bytes, max_age_s: float = 300, now: float | None = None) -> str | None:
    """None when `body` carries a valid MLflow signature made with `secret`; else why not."""
    sig, ts, delivery = headers.get(SIGNATURE), headers.get(TIMESTAMP), headers.get(DELIVERY)
    if not (sig and ts and delivery):
        return f"unsigned: {SIGNATURE}, {TIMESTAMP} and {DELIVERY} are required"
    try:
        age = (time.time() if now is None else now) - int(ts)
    except ValueError:
        return f"bad {TIMESTAMP} {ts[:40]!r}"
    if abs(age) > max_age_s:
        return f"timestamp {age:.0f} s off (more than {max_age_s:g} s): a replay or a skewed clock"
    mac = hmac.new(secret.encode(), delivery.encode() + b"." + ts.encode() + b"." + body, hashlib.sha256).digest()
    want = "v1," + base64.b64encode(mac).decode()
    if not any(hmac.compare_digest(want, s.strip()) for s in sig.split(" ")):
        return "signature does not match"
    return None


class Receiver:
    """A webhook endpoint on host:port (a thread) that hands each verified alias event to `handler`.

    `handler(name, alias, version) -> dict | None` runs on one worker thread, events in order; its results
    are in `handled`, its failures in `errors`.
    """

    def __init__(self, secret: str, handler: Callable[[str, str, int], dict | None], port: int,
                 host: str = "127.0.0.1", max_age_s: float = 300):
        if not secret:
            raise ValueError(f"a webhook secret is required ({SECRET_ENV}): an unsigned receiver would let anyone "
                             "who reaches it trigger checks and alias moves")
        self.secret, self.handler, self.max_age_s = secret, handler, max_age_s
        self.url = f"http://{host}:{port}/"
        self.handled: list[dict] = []
        self.errors: list[str] = []
        self._seen: set[str] = set()
        self._jobs: queue.Queue = queue.Queue()
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._threads = [threading.Thread(target=self._server.serve_forever, daemon=True, name="webhook-http"),
                         threading.Thread(target=self._work, daemon=True, name="webhook-worker")]

    def _handler_class(self):
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                n = int(self.headers.get("Content-Length") or 0)
                if n > MAX_BODY:
                    return self._reply(413, "body too large")
                body = self.rfile.read(n)
                if (why := signature_error(rec.secret, self.headers, body, rec.max_age_s)) is not None:
                    return self._reply(401, why)
                delivery = self.headers[DELIVERY]
                try:
                    event = json.loads(body)
                except ValueError:
                    return self._reply(400, "body is not JSON")
                if f"{event.get('entity')}.{event.get('action')}" != EVENT:
                    return self._reply(200, "ignored: not a model_version_alias.created event")
                if delivery in rec._seen:  # MLflow retries a delivery it thinks failed: once is enough
                    return self._reply(200, "already received")
                rec._seen.add(delivery)
                d = event.get("data") or {}
                rec._jobs.put((str(d.get("name")), str(d.get("alias")), int(d.get("version"))))
                return self._reply(202, "accepted")

            def _reply(self, code: int, text: str):
                self.send_response(code)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(text.encode())

            def log_message(self, *args):  # no access log on stderr
                pass

        return Handler

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if (res := self.handler(*job)) is not None:
                    self.handled.append(res)
            except Exception as e:  # one bad event must not stop the receiver
                self.errors.append(f"{job}: {type(e).__name__}: {e}")

    def __enter__(self) -> "Receiver":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._jobs.put(None)
        self._threads[1].join(timeout=600)


def champion_checker(model_name: str, champion_alias: str, *, threshold: float, confidence: float, work: Path,
                     serving_alias: str = "serving", on_serving: Callable[[int, Path, str], None] | None = None):
    """The handler for a Receiver: on `champion_alias` moving to a version of `model_name`, serve that
    version on a scoring server of its own (127.0.0.1, a free port), check its parity, record the result
    (tags; `serving_alias` moves only on a pass), then call `on_serving(version, model_dir, digest)`."""
    import socket

    def handle(name: str, alias: str, version: int) -> dict | None:
        if name != model_name or alias != champion_alias:
            return None
        local, digest = fetch_model(name, version, Path(work) / f"v{version}")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with scoring_server(local, digest, port) as url:
            res = verify_serving(url, name, version, threshold, confidence, Path(work) / f"check-v{version}",
                                 serving_alias)
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
