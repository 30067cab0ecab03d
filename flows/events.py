"""The data-drop event: what `qlora-ops drop` and the MinIO relay send to Prefect, and what the retraining
deployment's trigger (flows/triggers.py) listens for. One definition, so the three always agree.

    {"event": "qlora-ops.data.dropped",
     "resource": {"prefect.resource.id": "s3://qlora-ops/drops/week-07.jsonl",   # the dropped object
                  "prefect.resource.name": "week-07.jsonl",
                  "qlora-ops.store": "s3://qlora-ops"},                         # bucket (file:// for a directory)
     "payload": {"size": 5120, "etag": "...", "by": "dropper", "via": "minio-relay" | "qlora-ops drop"}, ...}

A trigger matches its own `data.source` by a glob on the resource id (`s3://qlora-ops/drops/*`), the
way Prefect's server matches resource labels (fnmatch). Events go to the server's events API
(POST /api/events, the open-source path; inbound webhooks are Prefect Cloud only) through Prefect's
own client, which adds PREFECT_API_AUTH_STRING. Importing this module is cheap (stdlib only): Prefect
is imported inside the functions that post.
"""
from __future__ import annotations

import glob
import uuid
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from urllib.parse import unquote_plus

EVENT = "qlora-ops.data.dropped"
# The label the trigger's for_each buckets on: one value per bucket/file system, so all drops into one
# data.source share one debounce window (see flows/triggers.py for why for_each must be set at all).
STORE_LABEL = "qlora-ops.store"
# Names the snapshot treats as data (tasks.data.readers.DATA_SUFFIXES / is_data_name; repeated here so the relay
# image needs nothing but this module), and never a path part starting with "." or "_" (temp files).
DATA_SUFFIXES = (".jsonl", ".csv", ".parquet", ".arrow")
SAVED_FILES = ("state.json", "dataset_info.json", "dataset_dict.json")
# Event ids are uuid5 of the object's identity: MinIO delivers at least once, and Prefect's triggers
# ignore an event id they have already seen, so a redelivered notification cannot count twice.
_NAMESPACE = uuid.UUID("6c1f0b1e-7a51-4c3e-9d0a-51a3f5e0d7a2")


class EventsUnavailable(RuntimeError):
    """The Prefect events API did not take the event (unreachable, refused auth, 5xx)."""


def is_data_key(key: str) -> bool:
    parts = PurePosixPath(key).parts
    if not parts or any(p.startswith((".", "_")) for p in parts):
        return False
    return key.lower().endswith(DATA_SUFFIXES) or parts[-1] in SAVED_FILES


def local_url(path: Path) -> str:
    """file:// URL of a local path, absolute and resolved: the resource id of a drop into a directory."""
    return Path(path).resolve().as_uri()


def store_of(url: str) -> str:
    """s3://bucket/a/b -> s3://bucket; file:///x/y -> file://."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def source_glob(source_url: str) -> str:
    """The resource-id glob of everything under a data.source URL (a prefix or directory), its literal
    part escaped so a `[` or `*` in a name matches only itself."""
    return glob.escape(source_url.rstrip("/") + "/") + "*"


def drop_event(url: str, *, size: int | None = None, etag: str | None = None, by: str | None = None,
               via: str, occurred: datetime | None = None, version: str | None = None) -> dict:
    """A Prefect event (JSON-ready dict, the server's Event schema) for the object at `url`."""
    occurred = occurred or datetime.now(timezone.utc)
    ident = "\0".join([url, str(version or ""), str(etag or ""), occurred.isoformat()])
    payload = {k: v for k, v in {"size": size, "etag": etag, "by": by, "via": via}.items() if v is not None}
    return {"occurred": occurred.isoformat(), "event": EVENT,
            "resource": {"prefect.resource.id": url, "prefect.resource.name": PurePosixPath(url).name,
                         STORE_LABEL: store_of(url)},
            "payload": payload, "id": str(uuid.uuid5(_NAMESPACE, ident)), "related": []}


def events_from_minio(notification: dict) -> list[dict]:
    """Prefect events for the data objects created in one MinIO webhook notification
    ({"EventName", "Key", "Records": [S3 event records]}); deletions, non-data and hidden keys are none.
    Record object keys are URL-encoded (S3 notification format): decoded here."""
    out = []
    for rec in notification.get("Records") or []:
        if not isinstance(rec, dict) or not str(rec.get("eventName", "")).startswith("s3:ObjectCreated:"):
            continue
        s3 = rec.get("s3") or {}
        bucket, obj = (s3.get("bucket") or {}).get("name"), s3.get("object") or {}
        key = unquote_plus(str(obj.get("key") or ""))
        if not bucket or not is_data_key(key):
            continue
        try:
            when = datetime.fromisoformat(str(rec.get("eventTime")).replace("Z", "+00:00"))
        except ValueError:
            when = datetime.now(timezone.utc)
        # The sequencer orders writes to one key: a second upload of the same name is a new event, a
        # redelivery of the same notification is not.
        out.append(drop_event(f"s3://{bucket}/{key}", size=obj.get("size"), etag=obj.get("eTag"),
                              by=(rec.get("userIdentity") or {}).get("principalId"), via="minio-relay",
                              occurred=when, version=obj.get("versionId") or obj.get("sequencer")))
    return out


def _checked(response) -> None:
    if response.status_code >= 300:
        raise EventsUnavailable(f"Prefect events API answered {response.status_code}: {response.text[:200]}")


def api_url() -> str | None:
    """The Prefect API events go to (PREFECT_API_URL, from the environment or the Prefect profile)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def _api_url() -> str:
    # Checked before posting: without it Prefect's client would start a temporary local server and the
    # event would go where nobody listens.
    if not (url := api_url()):
        raise EventsUnavailable("PREFECT_API_URL is not set: no Prefect server to send the event to")
    return url


def post_events(events: list[dict]) -> None:
    """POST the events to the Prefect server's events API (Prefect's sync client: auth string, TLS
    settings and retries from the Prefect settings). Raises EventsUnavailable."""
    if not events:
        return
    from prefect.client.orchestration import get_client
    from prefect.events import Event

    _api_url()
    body = [Event.model_validate(e).model_dump(mode="json") for e in events]  # Prefect's schema, checked here
    try:
        with get_client(sync_client=True) as client:
            _checked(client.request("POST", "/events", json=body))
    except EventsUnavailable:
        raise
    except Exception as e:  # httpx transport errors, auth refused, ...: one named failure
        raise EventsUnavailable(f"Prefect events API {_api_url()}: {type(e).__name__}: {e}") from e


async def apost_events(events: list[dict]) -> None:
    """post_events for an event loop (the relay)."""
    if not events:
        return
    from prefect.client.orchestration import get_client
    from prefect.events import Event

    _api_url()
    body = [Event.model_validate(e).model_dump(mode="json") for e in events]
    try:
        async with get_client() as client:
            _checked(await client.request("POST", "/events", json=body))
    except EventsUnavailable:
        raise
    except Exception as e:
        raise EventsUnavailable(f"Prefect events API {_api_url()}: {type(e).__name__}: {e}") from e
