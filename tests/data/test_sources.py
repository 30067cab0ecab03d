"""data.source snapshots (tasks/data/sources.py) and raw directories (tasks.data.prepare.load_raw on a snapshot).

Real parts: local directories, moto's standalone S3 server on 127.0.0.1 (a subprocess, stopped at the end
of the module), s3fs, pandas/pyarrow CSV and Parquet files.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from qlora_ops.tasks.core.config import ParamsError
from qlora_ops.tasks.data.prepare import DataError, load_raw
from qlora_ops.tasks.core.secrets import redact_url
from qlora_ops.tasks.data.sources import snapshot
from tests.conftest import S3_ENV, free_port, make_bucket, start_moto

BUCKET = "drops-bucket"


def rows(start: int, n: int, label: str = "a") -> str:
    return "".join(json.dumps({"instruction": "Label?", "input": f"text {i}", "output": label}) + "\n"
                   for i in range(start, start + n))


def params_error(fn, *args) -> str:
    with pytest.raises(ParamsError) as e:
        fn(*args)
    return str(e.value)


def tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- local sources
def test_local_dir_mirror_add_change_remove_and_ignored(tmp_path):
    src, dest = tmp_path / "drops", tmp_path / "ws" / "data" / "raw" / "team"
    (src / "2024" / "w2").mkdir(parents=True)
    (src / "w1.jsonl").write_text(rows(0, 5))
    (src / "2024" / "w2" / "b.csv").write_text("instruction,output\nQ,a\n")
    (src / "README.md").write_text("not data")
    (src / ".w3.jsonl.swp").write_text("editor temp")
    (src / "_SUCCESS").write_text("")

    s = snapshot(str(src), dest, {})
    assert s["files"] == ["2024/w2/b.csv", "w1.jsonl"] and s["added"] == s["files"]
    assert s["changed"] == [] and s["removed"] == []
    assert s["ignored"] == [".w3.jsonl.swp", "README.md", "_SUCCESS"]
    assert s["bytes"] == s["copied_bytes"] == sum(len(v) for v in tree(dest).values())
    assert tree(dest) == {"2024/w2/b.csv": b"instruction,output\nQ,a\n", "w1.jsonl": rows(0, 5).encode()}

    # nothing new: nothing copied
    s = snapshot(str(src), dest, {})
    assert (s["added"], s["changed"], s["removed"], s["copied_bytes"]) == ([], [], [], 0)

    # a new drop, a changed file (same size: detected by content, not size), a deleted one
    (src / "w4.jsonl").write_text(rows(10, 2))
    (src / "w1.jsonl").write_text(rows(0, 5).replace("text 3", "text 9"))
    (src / "2024" / "w2" / "b.csv").unlink()
    (dest / "stray.txt").write_text("not from the source")  # an exact mirror drops it too
    s = snapshot(str(src), dest, {})
    assert s["added"] == ["w4.jsonl"] and s["changed"] == ["w1.jsonl"]
    assert s["removed"] == ["2024/w2/b.csv", "stray.txt"]
    assert tree(dest) == {"w1.jsonl": (src / "w1.jsonl").read_bytes(), "w4.jsonl": rows(10, 2).encode()}
    assert not (dest / "2024").exists()  # emptied directories go too
    assert not list(dest.parent.glob(".team.snapshot-*"))  # no staging left behind


def test_single_file_source_is_mirrored_as_that_file(tmp_path):
    f = tmp_path / "export.jsonl"
    f.write_text(rows(0, 3))
    dest = tmp_path / "raw"
    dest.mkdir()
    (dest / "old.jsonl").write_text(rows(5, 1))
    s = snapshot(str(f), dest, {})
    assert s["files"] == ["export.jsonl"] and s["added"] == ["export.jsonl"] and s["removed"] == ["old.jsonl"]
    assert tree(dest) == {"export.jsonl": rows(0, 3).encode()}


def test_missing_empty_or_wrong_sources_name_data_source_and_the_fix(tmp_path):
    msg = params_error(snapshot, str(tmp_path / "nope"), tmp_path / "raw", {})
    assert "data.source=" in msg and "not found" in msg and "s3://" in msg and "null" in msg
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    msg = params_error(snapshot, str(tmp_path / "empty"), tmp_path / "raw", {})
    assert "data.source=" in msg and "no data file" in msg and "notes.txt" in msg and "*.jsonl" in msg
    (tmp_path / "one.txt").write_text("x")
    assert "single-file source" in params_error(snapshot, str(tmp_path / "one.txt"), tmp_path / "raw", {})
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jsonl").write_text(rows(0, 1))
    assert "overlap" in params_error(snapshot, str(tmp_path / "src"), tmp_path / "src" / "raw", {})
    assert not (tmp_path / "raw").exists()  # nothing created on a refusal


def test_a_failed_copy_never_leaves_a_partial_file_and_dest_unchanged(tmp_path, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    src, dest = tmp_path / "src", tmp_path / "raw"
    src.mkdir()
    (src / "a.jsonl").write_text(rows(0, 3))
    snapshot(str(src), dest, {})
    before = tree(dest)
    (src / "a.jsonl").write_text(rows(0, 50))
    (src / "b.jsonl").write_text(rows(100, 50))
    real = LocalFileSystem.get_file
    calls = []

    def crash_midway(self, rpath, lpath, **kw):  # the second download dies after writing half its bytes
        calls.append(rpath)
        if len(calls) == 2:
            Path(lpath).write_bytes(Path(rpath).read_bytes()[:100])
            raise ConnectionError("connection reset by peer")
        return real(self, rpath, lpath, **kw)

    monkeypatch.setattr(LocalFileSystem, "get_file", crash_midway)
    with pytest.raises(ConnectionError):
        snapshot(str(src), dest, {})
    assert tree(dest) == before  # all or nothing: the first (complete) download was not moved in either
    assert not list(tmp_path.glob(".raw.snapshot-*"))
    monkeypatch.setattr(LocalFileSystem, "get_file", real)
    s = snapshot(str(src), dest, {})
    assert s["changed"] == ["a.jsonl"] and s["added"] == ["b.jsonl"]
    assert tree(dest) == tree(src)


def test_redact_url():
    assert redact_url("s3://bucket/dvc") == "s3://bucket/dvc"
    assert redact_url("https://alice:s3cr3t@minio:9000/x") == "https://alice:***@minio:9000/x"
    assert redact_url("ssh://bob@host/path") == "ssh://bob@host/path"
    u = redact_url("https://h/p?token=abc&region=eu&X-Amz-Signature=ff&password=pw#frag")
    assert u == "https://h/p?token=***&region=eu&X-Amz-Signature=***&password=***#frag"
    assert "s3cr3t" not in redact_url("failed: remote https://alice:s3cr3t@h/x is down")  # works inside text


# ---------------------------------------------------------------- S3 (moto's real HTTP server)
@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with start_moto(tmp_path_factory.mktemp("moto")) as endpoint:
        make_bucket(endpoint, BUCKET)
        yield endpoint


@pytest.fixture
def s3_env(s3, monkeypatch):
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    return s3


def put(endpoint: str, key: str, body: bytes | str | None) -> None:
    import boto3

    c = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    if body is None:
        c.delete_object(Bucket=BUCKET, Key=key)
    else:
        c.put_object(Bucket=BUCKET, Key=key, Body=body.encode() if isinstance(body, str) else body)


def test_s3_prefix_snapshot(s3_env, tmp_path):
    ep, opts = s3_env, {"endpoint_url": s3_env}
    put(ep, "drops/w1.jsonl", rows(0, 4))
    put(ep, "drops/sub/w2.csv", "instruction,output\nQ,a\n")
    put(ep, "drops/manifest.json", "{}")
    put(ep, "other/w9.jsonl", rows(90, 1))  # outside the prefix
    dest = tmp_path / "raw"
    s = snapshot(f"s3://{BUCKET}/drops/", dest, opts)
    assert s["files"] == ["sub/w2.csv", "w1.jsonl"] and s["added"] == s["files"] and s["ignored"] == ["manifest.json"]
    assert s["source"] == f"s3://{BUCKET}/drops/"
    assert tree(dest) == {"sub/w2.csv": b"instruction,output\nQ,a\n", "w1.jsonl": rows(0, 4).encode()}

    import s3fs

    downloads = []
    real_get = s3fs.S3FileSystem._get_file

    async def counting_get(self, rpath, lpath, **kw):
        downloads.append(rpath)
        return await real_get(self, rpath, lpath, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(s3fs.S3FileSystem, "_get_file", counting_get)
        s = snapshot(f"s3://{BUCKET}/drops/", dest, opts)  # unchanged: the ETags match, nothing downloaded
        assert (s["added"], s["changed"], s["removed"], s["copied_bytes"]) == ([], [], [], 0)
        assert downloads == []
        put(ep, "drops/w1.jsonl", rows(0, 4).replace("text 1", "text 7"))  # same size, new bytes
        s = snapshot(f"s3://{BUCKET}/drops/", dest, opts)
        assert s["changed"] == ["w1.jsonl"] and downloads == [f"{BUCKET}/drops/w1.jsonl"]  # the spy sees downloads

    put(ep, "drops/w1.jsonl", rows(0, 4).replace("text 1", "text 8"))  # same size, new bytes again
    put(ep, "drops/sub/w2.csv", None)
    put(ep, "drops/w3.parquet", b"PAR1")
    s = snapshot(f"s3://{BUCKET}/drops", dest, opts)
    assert s["changed"] == ["w1.jsonl"] and s["removed"] == ["sub/w2.csv"] and s["added"] == ["w3.parquet"]
    assert (dest / "w1.jsonl").read_text() == rows(0, 4).replace("text 1", "text 8")

    msg = params_error(snapshot, f"s3://{BUCKET}/nothing-here/", tmp_path / "raw2", opts)
    assert f"data.source='s3://{BUCKET}/nothing-here/'" in msg and "not found" in msg
    msg = params_error(snapshot, "s3://no-such-bucket/drops/", tmp_path / "raw2", opts)
    assert "data.source=" in msg and "not found" in msg


def test_unreachable_s3_is_a_connection_error_not_bad_params(tmp_path, monkeypatch):
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConnectionError) as e:  # builtin: the flow retries it as a transient fault
        snapshot(f"s3://{BUCKET}/drops/", tmp_path / "raw", {"endpoint_url": f"http://127.0.0.1:{free_port()}"})
    assert "data.source=" in str(e.value) and "endpoint_url" in str(e.value)
    assert not (tmp_path / "raw").exists()


# ---------------------------------------------------------------- load_raw on a snapshot directory
def test_load_raw_directory_jsonl_csv_parquet_names_every_bad_row(tmp_path):
    d = tmp_path / "raw"
    (d / "sub").mkdir(parents=True)
    good = {"instruction": "Label?", "input": "j1", "output": "a"}
    (d / "b.jsonl").write_text(json.dumps(good) + "\n" + '{"instruction": "Label?", "input": "j2"}\n')
    (d / "a.csv").write_text('instruction,input,output\nLabel?,c1,a\nLabel?,"c2, with comma\nand a line break",b\n'
                             "Label?,c3,\n")
    pd.DataFrame({"instruction": ["Label?", None, "Label?"], "input": [None, "p2", "p3"],
                  "output": ["a", "b", "c"]}).to_parquet(d / "sub" / "c.parquet")
    (d / "notes.txt").write_text("ignored")
    msg = str(pytest.raises(DataError, load_raw, d).value)
    assert f"{d / 'a.csv'}:3: \"output\" must be a non-empty string" in msg  # row 3 = third data row (line 5)
    assert f"{d / 'b.jsonl'}:2: missing \"output\"" in msg
    assert f"{d / 'sub' / 'c.parquet'}:2: \"instruction\" must be a non-empty string (got None)" in msg
    assert "3 bad line(s)/row(s) in 3 of 3 files" in msg
    assert "row 1 is the first row after the header" in msg and 'README "Your own data"' in msg

    # fixed: every good row loads, files in sorted order (a.csv, b.jsonl, sub/c.parquet), rows in file order
    (d / "b.jsonl").write_text(json.dumps(good) + "\n")
    (d / "a.csv").write_text('\ufeffinstruction,input,output\nLabel?,c1,a\nLabel?,"c2, with comma\nand a line break",b\n')
    pd.DataFrame({"instruction": ["Label?", "Label?"], "input": [None, "p2"], "output": ["a", "b"]}).to_parquet(
        d / "sub" / "c.parquet")
    got = [(Path(r["file"]).name, r["line"], r["input"], r["output"]) for r in load_raw(d)]
    assert got == [("a.csv", 1, "c1", "a"), ("a.csv", 2, "c2, with comma\nand a line break", "b"),
                   ("b.jsonl", 1, "j1", "a"), ("c.parquet", 1, "", "a"), ("c.parquet", 2, "p2", "b")]


def test_load_raw_directory_file_level_errors(tmp_path):
    d = tmp_path / "raw"
    d.mkdir()
    assert "no *.jsonl, *.csv or *.parquet file" in str(pytest.raises(DataError, load_raw, d).value)
    (d / "a.csv").write_text("instruction,answer\nQ,x\n")
    (d / "b.csv").write_text("instruction,output\nQ,x,extra\n")
    (d / "c.parquet").write_bytes(b"not parquet")
    (d / "d.jsonl").write_text(rows(0, 2))
    msg = str(pytest.raises(DataError, load_raw, d).value)
    assert f"{d / 'a.csv'}: no column 'output'" in msg
    assert f"{d / 'b.csv'}: not a readable CSV file" in msg and "quote cells" in msg  # never a silently lost cell
    assert f"{d / 'c.parquet'}: not a readable Parquet file" in msg and "3 of 4 files" in msg


def test_prepare_conflicts_name_file_and_row_across_files(tmp_path):
    from qlora_ops.tasks.core.config import DataParams, Params
    from qlora_ops.tasks.data.prepare import prepare

    d = tmp_path / "raw"
    d.mkdir()
    (d / "a.jsonl").write_text(rows(0, 40, "a"))
    (d / "b.csv").write_text("instruction,input,output\nLabel?,text 3,b\n")
    params = Params(data=DataParams(raw=str(d), prepared=str(tmp_path / "out")))
    msg = str(pytest.raises(DataError, prepare, params, tmp_path).value)
    assert f"{d / 'a.jsonl'}:4 and {d / 'b.csv'}:1: the same prompt has two different outputs" in msg
    (d / "b.csv").write_text("instruction,input,output\nLabel?,text 99,a\n")
    assert prepare(params, tmp_path)["rows_raw"] == 41
