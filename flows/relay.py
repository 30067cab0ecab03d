"""MinIO bucket notification -> Prefect event: the relay of the team stack (infra/relay/).

    QLORA_RELAY_SECRET=<token MinIO sends> PREFECT_API_URL=http://prefect-server:4200/api \\
    PREFECT_API_AUTH_STRING=<user:secret> python -m qlora_ops.flows.relay --host 0.0.0.0 --port 8080

MinIO's webhook target (MINIO_NOTIFY_WEBHOOK_*_QLORA, `mc event add ... --event put`) POSTs one
notification per created object to /minio with `Authorization: Bearer <QLORA_RELAY_SECRET>`; the relay
turns each data object in it into a `qlora-ops.data.dropped` event (flows/events.py) and posts that to
the Prefect events API with the auth string only it holds. So droppers need an S3 key that can put under
drops/ and nothing else: no Prefect secret.

- 204: relayed (or nothing in it was a data file); 401: wrong or missing token; 400: not a notification
  (or a malformed Content-Length, or JSON nested deeper than MAX_DEPTH);
  413: body over 1 MiB; 502: Prefect did not take the event. MinIO keeps a notification in its queue
  (queue_dir) and retries it until it gets a 2xx, so a Prefect outage delays events, it loses none; a
  retried notification has the same event id and Prefect counts it once.
- HEAD /minio: 200, MinIO's liveness check of the target. GET /healthz: 200, for probes.
Stateless, and writes nothing to disk (runs on a read-only root filesystem). Built on Starlette and
uvicorn (both shipped with Prefect); what is hand-written is only the mapping in flows/events.py.
"""
from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import re
import sys

from qlora_ops.flows.events import EventsUnavailable, apost_events, events_from_minio

MAX_BODY = 1 << 20  # a notification is one record of ~1 KiB; anything near this is not MinIO
MAX_DEPTH = 32  # JSON nesting: a MinIO notification is 6 deep
log = logging.getLogger("qlora_ops.relay")
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[{]|[\]}]')  # a string (skipped), an opening or a closing bracket


def _depth_ok(body: bytes) -> bool:
    """True when the JSON text nests at most MAX_DEPTH arrays/objects (brackets inside strings do not count)."""
    depth = 0
    for m in _JSON_TOKEN.finditer(body):
        c = m.group()[:1]
        depth += 1 if c in b"[{" else -1 if c in b"]}" else 0
        if depth > MAX_DEPTH:
            return False
    return True


def create_app(token: str):
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    if not token:
        raise ValueError("QLORA_RELAY_SECRET is empty: the relay never runs unauthenticated")
    expected = f"Bearer {token}".encode()

    async def minio(request):
        if request.method == "HEAD":
            return Response(status_code=200)
        # Constant-time comparison of the whole header: no timing hint about the token.
        if not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
            return PlainTextResponse("unauthorized\n", status_code=401)
        length = request.headers.get("content-length") or "0"
        # ASCII digits only: str.isdigit() takes "²" (and int() then raises: a 500 before this check).
        if not (length.isascii() and length.isdigit()):
            return PlainTextResponse("malformed Content-Length\n", status_code=400)
        if int(length) > MAX_BODY:
            return PlainTextResponse("body too large\n", status_code=413)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return PlainTextResponse("body too large\n", status_code=413)
        if not _depth_ok(body):  # json.loads would recurse until RecursionError (a 500)
            return PlainTextResponse(f"not a MinIO notification: nests deeper than {MAX_DEPTH}\n", status_code=400)
        try:
            notification = json.loads(body)
            if not isinstance(notification, dict):
                raise ValueError("not a JSON object")
            events = events_from_minio(notification)
        except (ValueError, TypeError, AttributeError) as e:
            return PlainTextResponse(f"not a MinIO notification: {e}\n", status_code=400)
        try:
            await apost_events(events)
        except EventsUnavailable as e:
            log.error("relay: %d event(s) not taken, MinIO will retry: %s", len(events), e)
            return PlainTextResponse("Prefect events API unavailable\n", status_code=502)
        for ev in events:
            log.info("relay: %s %s (%s bytes, by %s)", ev["event"], ev["resource"]["prefect.resource.id"],
                     ev["payload"].get("size"), ev["payload"].get("by"))
        return Response(status_code=204)

    async def healthz(request):
        return PlainTextResponse("ok\n")

    return Starlette(routes=[Route("/minio", minio, methods=["POST", "HEAD"]),
                             Route("/healthz", healthz, methods=["GET"])])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qlora_ops.flows.relay", description=__doc__.splitlines()[0])
    ap.add_argument("--host", default=os.environ.get("QLORA_RELAY_HOST", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("QLORA_RELAY_PORT", "8080")))
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    if not os.environ.get("PREFECT_API_URL"):
        print("relay: PREFECT_API_URL is not set (e.g. http://prefect-server:4200/api)", file=sys.stderr)
        return 2
    try:
        app = create_app(os.environ.get("QLORA_RELAY_SECRET", ""))
    except ValueError as e:
        print(f"relay: {e}", file=sys.stderr)
        return 2
    import uvicorn

    # No access log: it adds nothing to the one line per relayed event. No Server header, no proxy
    # headers trusted; idle connections closed after 5 s.
    uvicorn.run(app, host=a.host, port=a.port, access_log=False, server_header=False, proxy_headers=False,
                timeout_keep_alive=5, limit_concurrency=64, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
