"""One bad drop cannot block the loop (issue 25): a drop that fails validation against the current data is
quarantined with its reason and the run goes on with the last good data; a failed prepare never deletes
the last good prepared data nor re-points the raw .dvc file; `drop` itself checks against the current data.

DVC on temp git repos (tests/data/test_versioning.py's helpers); S3 on moto's standalone server.
"""
from __future__ import annotations

import json

import pytest

from qlora_ops.tasks.core.config import load_params
from qlora_ops.tasks.data import quarantine
from qlora_ops.tasks.data.prepare import DataError
from qlora_ops.tasks.data.versioning import prepare_via_dvc
from tests.conftest import S3_ENV, make_bucket, start_moto
from tests.data.test_versioning import LABELS, drop_rows, dvc_file_md5, workspace_with_drops, write_params


def conflicting(i: int) -> str:
    """Row i of drop_rows with another label: a corrected label, written as an ordinary drop."""
    row = json.loads(drop_rows(i, 1))
    row["output"] = LABELS[(i + 1) % 4]
    return json.dumps(row) + "\n"


def test_a_drop_conflicting_with_earlier_data_is_quarantined_and_the_run_goes_on(tmp_path):
    ws, drops = workspace_with_drops(tmp_path, **{"week1.jsonl": drop_rows(0, 60)})
    p = write_params(ws, "d", data={"source": str(drops), "raw": "data/raw/d", "prepared": "data/prepared/d"})
    first = prepare_via_dvc(ws, p, load_params(p))
    (drops / "week2.jsonl").write_text(drop_rows(100, 20) + conflicting(5))
    (drops / "week3.jsonl").write_text(drop_rows(200, 20))  # a good drop in the same run is kept
    res = prepare_via_dvc(ws, p, load_params(p))
    [q] = res["source"]["quarantined"]
    assert q["name"] == "week2.jsonl" and "week1.jsonl:6 and " in q["reason"] and "week2.jsonl:21" in q["reason"]
    assert res["source"]["files"] == ["week1.jsonl", "week3.jsonl"] and res["source"]["added"] == ["week3.jsonl"]
    assert res["data_version"] != first["data_version"]
    assert quarantine.listed(str(drops)) == [{"name": "week2.jsonl", "reason": q["reason"]}]
    assert prepare_via_dvc(ws, p, load_params(p))["source"]["quarantined"] == []  # the next run is clean


def test_a_failed_prepare_keeps_the_last_good_data_and_its_dvc_file(tmp_path):
    ws, _ = workspace_with_drops(tmp_path)
    raw = ws / "data" / "raw" / "mine"
    raw.mkdir(parents=True)
    (raw / "a.jsonl").write_text(drop_rows(0, 60))
    p = write_params(ws, "m", data={"raw": "data/raw/mine", "prepared": "data/prepared/mine"})
    prepare_via_dvc(ws, p, load_params(p))
    test = (ws / "data" / "prepared" / "mine" / "test.jsonl").read_bytes()
    md5 = dvc_file_md5(ws, "data/raw/mine.dvc")
    (raw / "b.jsonl").write_text(conflicting(3))
    with pytest.raises(DataError, match=r"a.jsonl:4 and .*b.jsonl:1"):
        prepare_via_dvc(ws, p, load_params(p))
    assert (ws / "data" / "prepared" / "mine" / "test.jsonl").read_bytes() == test  # not deleted by DVC
    assert dvc_file_md5(ws, "data/raw/mine.dvc") == md5  # the raw .dvc file still names the last good version


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with start_moto(tmp_path_factory.mktemp("moto")) as endpoint:
        make_bucket(endpoint, "q-bucket")
        yield endpoint


def test_a_bad_s3_drop_moves_to_the_quarantine_prefix_with_its_reason(s3, tmp_path, monkeypatch):
    import boto3

    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=s3, region_name="us-east-1")
    client.put_object(Bucket="q-bucket", Key="drops/a.jsonl", Body=drop_rows(0, 60).encode())
    client.put_object(Bucket="q-bucket", Key="drops/b.jsonl", Body=b'{"instruction": "x"}\n')
    ws, _ = workspace_with_drops(tmp_path)
    p = write_params(ws, "s", data={"source": "s3://q-bucket/drops/", "source_options": {"endpoint_url": s3},
                                    "raw": "data/raw/s", "prepared": "data/prepared/s"})
    res = prepare_via_dvc(ws, p, load_params(p))
    assert [q["name"] for q in res["source"]["quarantined"]] == ["b.jsonl"]
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="q-bucket")["Contents"]}
    assert keys == {"drops/a.jsonl", "quarantine/b.jsonl", "quarantine/b.jsonl.reason.txt"}
    listed = quarantine.listed("s3://q-bucket/drops/", {"endpoint_url": s3})
    assert listed[0]["name"] == "b.jsonl" and "b.jsonl:1" in listed[0]["reason"]


def test_drop_checks_the_file_against_the_current_data_and_never_replaces_one(tmp_path, monkeypatch):
    from qlora_ops.flows.drop import drop
    from qlora_ops.tasks.core.config import DataParams, Params

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    src = tmp_path / "incoming"
    src.mkdir()
    (src / "week1.jsonl").write_text(drop_rows(0, 60))
    params = Params(data=DataParams(source=str(src), raw=str(tmp_path / "raw"), prepared=str(tmp_path / "prepared")))
    bad = tmp_path / "week2.jsonl"
    bad.write_text(drop_rows(100, 5) + conflicting(7))
    with pytest.raises(DataError, match=r"week1.jsonl:8 and .*week2.jsonl:6"):
        drop(bad, params, tmp_path)
    assert not (src / "week2.jsonl").exists()
    other = tmp_path / "elsewhere" / "week1.jsonl"
    other.parent.mkdir()
    other.write_text(drop_rows(300, 10))
    with pytest.raises(DataError, match="never replaces"):
        drop(other, params, tmp_path)
    assert (src / "week1.jsonl").read_text() == drop_rows(0, 60)
    good = tmp_path / "week3.jsonl"
    good.write_text(drop_rows(400, 10))
    assert drop(good, params, tmp_path)["rows"] == 10


def test_the_summary_says_which_files_a_version_took_in_and_ignored(tmp_path):
    from qlora_ops.flows.retrain import data_changes, format_summary, refuse_contamination
    from qlora_ops.tasks.data.sources import snapshot

    src = tmp_path / "drops"
    src.mkdir()
    (src / "week1.jsonl").write_text(drop_rows(0, 10))
    (src / "week2.json").write_text("{}")
    (src / "week3.jsonl.gz").write_bytes(b"\x1f\x8b")
    changes = data_changes({**snapshot(str(src), tmp_path / "raw"), "quarantined": []})
    s = {"outcome": "skipped", "reason": "nothing new", "fingerprint": "f", "stage_seconds": {},
         "data": {"version": "v", "changes": changes}}
    out = format_summary(s)
    assert "added 1 (week1.jsonl)" in out and "ignored 2 (week2.json, week3.jsonl.gz)" in out
    assert "not a data file" in out
    with pytest.raises(DataError, match="contamination: 2 test row"):
        refuse_contamination({"contamination": 2, "lineage": 1})
