"""Event-driven retraining without servers: the drop event's shape, the MinIO notification mapping, the
relay's answers, the debounce trigger `qlora-ops deploy` installs, and `drop`'s refusals.

The same paths against a real Prefect server, worker, MinIO-shaped relay traffic and S3 with a put-only
key: tests/integration/test_drop_events.py.
"""
from __future__ import annotations

import copy
import fnmatch
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from qlora_ops.flows import events
from tests.conftest import ROOT

# What MinIO's webhook target POSTs for one PutObject (internal/event: event.Log{EventName, Key, Records});
# the record's object key is URL-encoded, the top-level Key is not.
MINIO = {
    "EventName": "s3:ObjectCreated:Put",
    "Key": "qlora-ops/drops/week 07.jsonl",
    "Records": [{
        "eventVersion": "2.0", "eventSource": "minio:s3", "awsRegion": "", "eventTime": "2026-12-01T10:00:00.123Z",
        "eventName": "s3:ObjectCreated:Put", "userIdentity": {"principalId": "dropper"},
        "requestParameters": {"principalId": "dropper", "region": "", "sourceIPAddress": "10.0.0.7"},
        "responseElements": {"x-amz-id-2": "dd9025bab4ad464b", "x-amz-request-id": "1808D0A7A4F0C5E1",
                             "x-minio-origin-endpoint": "http://10.0.0.3:9000"},
        "s3": {"s3SchemaVersion": "1.0", "configurationId": "Config",
               "bucket": {"name": "qlora-ops", "ownerIdentity": {"principalId": "dropper"}, "arn": "arn:aws:s3:::qlora-ops"},
               "object": {"key": "drops%2Fweek+07.jsonl", "size": 5120, "eTag": "0f343b0931126a20f133d67c2b018a3b",
                          "contentType": "application/jsonl", "userMetadata": {"content-type": "application/jsonl"},
                          "versionId": "1c5b8e1f-3f0e-4c5e-9d2a-8c1f7c0b6a11", "sequencer": "1808D0A7A5A1B2C3"}},
        "source": {"host": "10.0.0.7", "port": "", "userAgent": "aiobotocore/2.15"}}]}


def _notification(key: str, name: str = "s3:ObjectCreated:Put", **obj) -> dict:
    n = copy.deepcopy(MINIO)
    n["EventName"] = n["Records"][0]["eventName"] = name
    n["Records"][0]["s3"]["object"].update(key=key, **obj)
    return n


def test_minio_notification_becomes_a_valid_prefect_event():
    from prefect.server.events.schemas.events import Event  # the schema the server's POST /events applies

    [ev] = events.events_from_minio(MINIO)
    Event.model_validate(ev)
    assert ev["event"] == events.EVENT == "qlora-ops.data.dropped"
    assert ev["resource"] == {"prefect.resource.id": "s3://qlora-ops/drops/week 07.jsonl",
                              "prefect.resource.name": "week 07.jsonl", events.STORE_LABEL: "s3://qlora-ops"}
    assert ev["payload"] == {"size": 5120, "etag": "0f343b0931126a20f133d67c2b018a3b", "by": "dropper",
                             "via": "minio-relay"}
    assert ev["occurred"].startswith("2026-12-01T10:00:00.123")
    # At-least-once delivery: the same notification again is the same event (Prefect counts an id once) ...
    assert events.events_from_minio(copy.deepcopy(MINIO))[0]["id"] == ev["id"]
    # ... while a second upload of the same name is a new one.
    again = _notification("drops%2Fweek+07.jsonl", versionId="2f", sequencer="1808D0A7A5A1B2C4")
    assert events.events_from_minio(again)[0]["id"] != ev["id"]


@pytest.mark.parametrize("key,name", [
    ("drops%2F.week07.jsonl.part", "s3:ObjectCreated:Put"),      # a client's temp name
    ("drops%2F_SUCCESS", "s3:ObjectCreated:Put"),                 # not data (pyarrow/Spark marker)
    ("drops%2Freadme.txt", "s3:ObjectCreated:Put"),               # not a data file
    ("drops%2F_tmp%2Fx.jsonl", "s3:ObjectCreated:Put"),           # under a hidden directory
    ("drops%2Fweek07.jsonl", "s3:ObjectRemoved:Delete"),          # a deletion is not new data
])
def test_notifications_that_are_not_new_data_relay_nothing(key, name):
    assert events.events_from_minio(_notification(key, name)) == []


def test_data_names_match_the_snapshot():
    """The relay image carries only flows/: its copy of the data-file rule must equal tasks.data.readers'."""
    from qlora_ops.tasks.data import readers as data

    assert events.DATA_SUFFIXES == data.DATA_SUFFIXES and events.SAVED_FILES == data.SAVED_FILES
    for key in ("a.jsonl", "x/y.CSV", "d/state.json", "d/data-00000-of-00001.arrow", "notes.md", "a.json"):
        assert events.is_data_key(key) == data.is_data_name(key), key


def test_source_glob_matches_its_own_prefix_only():
    g = events.source_glob("s3://qlora-ops/drops/")
    assert g == events.source_glob("s3://qlora-ops/drops")
    assert fnmatch.fnmatchcase("s3://qlora-ops/drops/week 07.jsonl", g)
    assert fnmatch.fnmatchcase("s3://qlora-ops/drops/2026/12/a.csv", g)
    assert not fnmatch.fnmatchcase("s3://qlora-ops/drops-old/a.jsonl", g)
    assert not fnmatch.fnmatchcase("s3://other/drops/a.jsonl", g)
    odd = events.source_glob("file:///data/in[1]")  # glob characters in the name match only themselves
    assert fnmatch.fnmatchcase("file:///data/in[1]/a.jsonl", odd)
    assert not fnmatch.fnmatchcase("file:///data/in1/a.jsonl", odd)


def _params(tmp_path: Path, **data):
    from qlora_ops.tasks.core.config import Params

    return Params(data={"raw": "data/raw/x", **data}, orchestration={"deployment": "team", "debounce_s": 42})


def test_trigger_is_a_proactive_debounce_on_the_source(tmp_path):
    from prefect.events.schemas.automations import Posture
    from prefect.server.events.schemas.automations import AutomationCore  # what the server validates

    from qlora_ops.flows.triggers import retrain_triggers

    [t] = retrain_triggers(_params(tmp_path, source="s3://qlora-ops/drops/"), tmp_path, "qlora-retrain/team")
    assert t.posture == Posture.Proactive and t.threshold == 1 and t.within == timedelta(seconds=42)
    assert t.after == t.expect == {events.EVENT}
    # Without for_each the server's periodic evaluation would fire it every `within` with no drop at all.
    assert t.for_each == {events.STORE_LABEL}
    assert t.match.root == {"prefect.resource.id": "s3://qlora-ops/drops/*"}
    import uuid
    t.set_deployment_id(uuid.uuid4())
    auto = AutomationCore.model_validate(json.loads(t.as_automation().model_dump_json()))
    assert auto.actions[0].type == "run-deployment" and auto.actions[0].parameters is None
    # A directory source is matched by its resolved file:// URL, the id `drop` gives its events.
    [d] = retrain_triggers(_params(tmp_path, source="incoming"), tmp_path, "qlora-retrain/team")
    assert d.match.root["prefect.resource.id"] == events.source_glob((tmp_path / "incoming").resolve().as_uri())
    assert retrain_triggers(_params(tmp_path), tmp_path, "qlora-retrain/team") == []  # no source: cron only


def test_debounce_below_prefects_minimum_is_refused_naming_the_key(tmp_path):
    from qlora_ops.tasks.core.config import ParamsError, load_params

    p = tmp_path / "p.yaml"
    p.write_text("orchestration:\n  debounce_s: 5\n")
    with pytest.raises(ParamsError, match=r"orchestration\.debounce_s"):
        load_params(p)


# ---------------------------------------------------------------- drop's refusals (no server needed)
def _cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    return subprocess.run([sys.executable, "-m", "qlora_ops.flows.cli", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**base, "PYTHONPATH": str(ROOT), **env})


@pytest.fixture
def dropbox(tmp_path):
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "dir.yaml").write_text(f"data:\n  source: {tmp_path / 'dropbox'}\n  raw: data/raw/x\n")
    return tmp_path / "dropbox"


def test_bad_file_is_refused_with_file_and_line_and_nothing_lands(tmp_path, dropbox):
    bad = tmp_path / "week07.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    # A Prefect API that is never reached: the refusal comes before any event.
    r = _cli(tmp_path, "drop", str(bad), "--params", "params/dir.yaml", PREFECT_API_URL="http://127.0.0.1:9/api")
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{bad}:2: missing \"output\"" in r.stderr
    assert not dropbox.exists() or not any(dropbox.iterdir())


def test_good_file_lands_whole_in_a_directory_source(tmp_path, dropbox):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from qlora_ops.flows.drop import drop
    from qlora_ops.tasks.core.config import load_params

    good = tmp_path / "week07.csv"
    good.write_text("instruction,output\nWhich?,json\nWhat?,os\n")
    with temporary_settings(updates={PREFECT_API_URL: None}):  # one machine, no Prefect server: no event
        res = drop(good, load_params(tmp_path / "params" / "dir.yaml"), tmp_path)
    assert (res["rows"], res["format"], res["event"]) == (2, "alpaca", None)
    assert [p.name for p in dropbox.iterdir()] == ["week07.csv"]  # no temp file left beside it
    assert (dropbox / "week07.csv").read_bytes() == good.read_bytes()


def test_directory_drop_whose_event_is_not_taken_exits_4_with_the_file_in_place(tmp_path, dropbox):
    good = tmp_path / "week07.jsonl"
    good.write_text('{"instruction": "a", "output": "b"}\n')
    r = _cli(tmp_path, "drop", str(good), "--params", "params/dir.yaml", PREFECT_API_URL="http://127.0.0.1:9/api",
             PREFECT_CLIENT_MAX_RETRIES="0")
    assert r.returncode == 4, r.stdout + r.stderr
    assert "dropped, not announced" in r.stderr and "http://127.0.0.1:9/api" in r.stderr
    assert "next scheduled run picks it up" in r.stderr
    assert (dropbox / "week07.jsonl").read_bytes() == good.read_bytes()


@pytest.mark.parametrize("source,why", [(None, "data.source is null"), ("incoming/all.jsonl", "is one file"),
                                        ("s3://b/drops/all.parquet", "is one file")])
def test_drop_needs_a_directory_or_prefix_source(tmp_path, source, why):
    from qlora_ops.flows.drop import drop
    from qlora_ops.tasks.core.config import Params, ParamsError

    f = tmp_path / "a.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n')
    with pytest.raises(ParamsError, match=why):
        drop(f, Params(data={"source": source, "raw": "data/raw/x"}), tmp_path)


def test_hidden_or_unknown_names_are_refused(tmp_path):
    from qlora_ops.flows.drop import drop
    from qlora_ops.tasks.core.config import Params
    from qlora_ops.tasks.data.prepare import DataError

    for name in (".a.jsonl", "_a.jsonl", "a.txt"):
        f = tmp_path / name
        f.write_text('{"instruction": "a", "output": "b"}\n')
        with pytest.raises(DataError, match="rename the file"):
            drop(f, Params(data={"source": str(tmp_path / "in"), "raw": "data/raw/x"}), tmp_path)


# ---------------------------------------------------------------- the relay's answers (Prefect unreachable)
@pytest.fixture
def relay():
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings
    from starlette.testclient import TestClient

    from qlora_ops.flows.relay import create_app

    # Nothing listens there, and no retries: the 502 path answers at once.
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api", PREFECT_CLIENT_MAX_RETRIES: 0}), \
            TestClient(create_app("s3cret")) as c:
        yield c


def test_relay_refuses_what_minio_did_not_send(relay):
    ok = {"Authorization": "Bearer s3cret"}
    assert relay.head("/minio").status_code == 200  # MinIO's liveness check of its target
    assert relay.get("/healthz").text == "ok\n"
    assert relay.post("/minio", json=MINIO).status_code == 401
    assert relay.post("/minio", json=MINIO, headers={"Authorization": "Bearer s3cre"}).status_code == 401
    assert relay.post("/minio", json=MINIO, headers={"Authorization": "s3cret"}).status_code == 401
    assert relay.post("/minio", content=b"not json", headers=ok).status_code == 400
    assert relay.post("/minio", content=b"x" * (2 << 20), headers=ok).status_code == 413
    # Nothing to relay (a deletion): 204 without touching Prefect.
    assert relay.post("/minio", json=_notification("drops%2Fa.jsonl", "s3:ObjectRemoved:Delete"),
                      headers=ok).status_code == 204
    # Prefect unreachable: 502, so MinIO keeps the notification queued and retries it.
    assert relay.post("/minio", json=MINIO, headers=ok).status_code == 502


def test_relay_will_not_start_without_a_token():
    from qlora_ops.flows.relay import create_app

    with pytest.raises(ValueError, match="QLORA_RELAY_SECRET"):
        create_app("")


def test_relay_answers_400_to_malformed_lengths_and_deep_bodies(relay):
    """Authenticated garbage is a 400, never a 500: `Content-Length: ²` (str.isdigit() says yes, int() says
    no) and JSON nested until json.loads runs out of recursion."""
    ok = {"Authorization": "Bearer s3cret"}
    for bad in (b"\xb2", b"-1", b"1e3", b" 12"):  # \xb2 is "²" as Starlette decodes headers (latin-1)
        assert _asgi_post(relay.app, [(b"authorization", b"Bearer s3cret"), (b"content-length", bad)], b"{}") == 400, bad
    for depth in (33, 100_000):
        r = relay.post("/minio", content=b"[" * depth + b"]" * depth, headers=ok)
        assert r.status_code == 400 and "deeper" in r.text
    # Brackets inside strings are not nesting: judged on its content (no records: nothing to relay).
    assert relay.post("/minio", content=json.dumps({"k": "[[[[" * 50}).encode(), headers=ok).status_code == 204


def _asgi_post(app, headers: list[tuple[bytes, bytes]], body: bytes) -> int:
    """The status `app` answers to a POST /minio with exactly these header bytes (an HTTP client would
    re-encode them; uvicorn's h11 passes what it parses)."""
    import asyncio

    sent: list[dict] = []
    scope = {"type": "http", "http_version": "1.1", "method": "POST", "path": "/minio", "raw_path": b"/minio",
             "root_path": "", "scheme": "http", "query_string": b"", "headers": headers, "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 8080)}

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(msg):
        sent.append(msg)

    try:
        asyncio.run(app(scope, receive, send))
    except Exception:  # what Starlette's error middleware re-raises after answering 500
        pass
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def test_relay_fuzzed_bodies_get_4xx_or_its_own_answers_never_500(relay):
    """Whatever JSON an authenticated sender posts (records of any shape, any nesting), the relay answers
    400 (not a notification), 204 (nothing to relay) or 502 (Prefect unreachable here): never a 500."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8) | \
        st.sampled_from(["s3:ObjectCreated:Put", "drops/a.jsonl", "bucket", "2024-01-01T00:00:00Z"])
    keys = st.sampled_from(["Records", "eventName", "s3", "bucket", "name", "object", "key", "size", "eTag",
                            "eventTime", "userIdentity", "principalId", "versionId", "sequencer", "x"])
    tree = st.recursive(leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(keys, c, max_size=4), max_leaves=25)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(body=tree)
    def check(body):
        r = relay.post("/minio", content=json.dumps(body).encode(), headers={"Authorization": "Bearer s3cret"})
        assert r.status_code in (204, 400, 502), (body, r.status_code)

    check()
