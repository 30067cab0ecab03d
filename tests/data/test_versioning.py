"""Data versioning (tasks/data/versioning.py) for real: DVC on temp git repos, a local directory remote and an
S3 remote on moto's standalone server (a subprocess on 127.0.0.1, stopped at the end of the module).

What it proves: a drop in data.source becomes a new data version, every version is pushed, an unchanged
rerun costs seconds and changes nothing, and a fresh clone plus the DVC files a run returns (the flow logs
them on the MLflow run) pulls the exact bytes of that version back.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qlora_ops.tasks.data import versioning
from qlora_ops.tasks.core.config import ParamsError, load_params
from qlora_ops.tasks.data.versioning import REMOTE, configure_remote, prepare_via_dvc
from tests.conftest import S3_ENV, free_port, make_bucket, make_workspace, start_moto

LABELS = ["json", "os", "re", "math"]
BUCKET = "team-bucket"


def drop_rows(start: int, n: int) -> str:
    return "".join(json.dumps({"instruction": "Which module is this about?", "input": f"Item {i} is about "
                               f"{LABELS[i % 4]} things, number {i}.", "output": LABELS[i % 4]}) + "\n"
                   for i in range(start, start + n))


def write_params(ws: Path, name: str, **sections) -> Path:
    p = ws / "params" / f"{name}.yaml"
    p.write_text(yaml.safe_dump(sections))
    return p


def run(ws: Path, name: str) -> dict:
    p = ws / "params" / f"{name}.yaml"
    return prepare_via_dvc(ws, p, load_params(p))


def dvc_cli(cwd: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"dvc {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def save_version(ws: Path, res: dict, raw: str) -> dict:
    """What a run pins: its DVC files (as logged on MLflow) and the bytes it trained/tested on."""
    return {"dvc_files": {f: (ws / f).read_bytes() for f in res["dvc_files"]},
            "test": (Path(res["prepared_dir"]) / "test.jsonl").read_bytes(),
            "raw": {p.relative_to(ws / raw).as_posix(): p.read_bytes() for p in (ws / raw).rglob("*") if p.is_file()}}


def pull_into_fresh_clone(ws: Path, dst: Path, version: dict, stage: str, raw: str, url: str, **options: str) -> None:
    """Anyone, anywhere: git clone + the logged DVC files + `dvc pull` gives the exact data of that version."""
    subprocess.run(["git", "clone", "-q", str(ws), str(dst)], check=True)
    for rel, content in version["dvc_files"].items():
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_bytes(content)
    dvc_cli(dst, "remote", "add", "--local", "-d", REMOTE, url)
    for k, v in options.items():
        dvc_cli(dst, "remote", "modify", "--local", REMOTE, k, v)
    dvc_cli(dst, "pull", stage, f"{raw}.dvc")
    assert (dst / "data" / "prepared").exists()
    prepared = yaml.safe_load((dst / "dvc.lock").read_text())["stages"][stage]["outs"][0]["path"]
    assert (dst / prepared / "test.jsonl").read_bytes() == version["test"]
    assert {p.relative_to(dst / raw).as_posix(): p.read_bytes() for p in (dst / raw).rglob("*") if p.is_file()} \
        == version["raw"]


def remote_md5s(remote: Path) -> set[str]:
    """Object ids in a DVC 3 directory remote (files/md5/ab/cdef... -> abcdef...)."""
    return {p.parent.name + p.name for p in (remote / "files" / "md5").rglob("*") if p.is_file()}


def lock_md5s(ws: Path, stage: str) -> set[str]:
    return {o["md5"] for o in yaml.safe_load((ws / "dvc.lock").read_text())["stages"][stage]["outs"]}


def dvc_file_md5(ws: Path, rel: str) -> str:
    return yaml.safe_load((ws / rel).read_text())["outs"][0]["md5"]


def workspace_with_drops(tmp_path: Path, **files: str) -> tuple[Path, Path]:
    """A temp git + DVC workspace and, beside it, a drop directory holding `files` (name -> text)."""
    ws = make_workspace(tmp_path / "ws")
    drops = tmp_path / "drops"
    drops.mkdir()
    for name, text in files.items():
        (drops / name).write_text(text)
    return ws, drops


# ---------------------------------------------------------------- local source, embedded local remote
def test_drops_are_versioned_pushed_and_any_version_pulls_back_exactly(tmp_path):
    ws, drops = workspace_with_drops(tmp_path, **{"week-01.jsonl": drop_rows(0, 60), "README.txt": "drop zone"})
    raw = "data/raw/drops"
    write_params(ws, "drops", data={"source": str(drops), "raw": raw, "prepared": "data/prepared/drops"})

    r1 = run(ws, "drops")
    remote = ws / ".qlora-ops" / "dvc-remote"
    assert r1["stage"] == "prepare-drops" and r1["reran"] and r1["remote"] == str(remote.resolve())
    assert r1["source"]["added"] == ["week-01.jsonl"] and r1["source"]["ignored"] == ["README.txt"]
    assert r1["dvc_files"] == ["dvc.yaml", "dvc.lock", f"{raw}.dvc", "params/drops.yaml"]
    assert r1["deps"][raw] == dvc_file_md5(ws, f"{raw}.dvc")  # the stage reads the dvc-added snapshot
    # pushed: the prepared splits AND the raw snapshot (--with-deps follows the stage to the .dvc file)
    assert r1["pushed"] == 8  # raw: .dir + 1 file; prepared: .dir + train/val/test/stats; the lineage file
    assert lock_md5s(ws, "prepare-drops") | {dvc_file_md5(ws, f"{raw}.dvc")} <= remote_md5s(remote)
    assert len(remote_md5s(remote)) == 8
    cfg = (ws / ".dvc" / "config.local").read_text()
    assert f'remote = {REMOTE}' in cfg and str(remote.resolve()) in cfg
    v1 = save_version(ws, r1, raw)

    # nothing new: same version, nothing rerun or pushed, and only seconds
    t = time.time()
    r2 = run(ws, "drops")
    took = time.time() - t
    assert r2["data_version"] == r1["data_version"] and not r2["reran"] and r2["pushed"] == 0
    assert (r2["source"]["added"], r2["source"]["changed"], r2["source"]["removed"]) == ([], [], [])
    assert took < 10, f"an unchanged rerun took {took:.1f}s"

    # a new drop: a new raw .dvc md5, a new data version, pushed
    (drops / "week-02.jsonl").write_text(drop_rows(60, 30))
    r3 = run(ws, "drops")
    assert r3["source"]["added"] == ["week-02.jsonl"] and r3["reran"]
    assert r3["data_version"] != r1["data_version"] and r3["pushed"] > 0
    assert json.loads((Path(r3["prepared_dir"]) / "stats.json").read_text())["rows_raw"] == 90
    v3 = save_version(ws, r3, raw)
    assert v3["dvc_files"][f"{raw}.dvc"] != v1["dvc_files"][f"{raw}.dvc"]

    # a removed drop is removed from the snapshot too (exact mirror): back to the first data
    (drops / "week-02.jsonl").unlink()
    r4 = run(ws, "drops")
    assert r4["source"]["removed"] == ["week-02.jsonl"] and r4["data_version"] == r1["data_version"]

    # a fresh clone + the DVC files of a version + `dvc pull` = that version's exact bytes, old or new
    shutil.rmtree(ws / ".dvc" / "cache")  # nothing local to fall back on: the bytes come from the remote
    pull_into_fresh_clone(ws, tmp_path / "clone-v3", v3, "prepare-drops", raw, str(remote.resolve()))
    pull_into_fresh_clone(ws, tmp_path / "clone-v1", v1, "prepare-drops", raw, str(remote.resolve()))


def test_default_sample_stage_output_is_pushed_with_the_prepare_stage(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    res = prepare_via_dvc(ws, ws / "params" / "default.yaml", load_params(ws / "params" / "default.yaml"))
    assert res["stage"] == "prepare" and res["source"] is None and res["dvc_files"] == [
        "dvc.yaml", "dvc.lock", "params/default.yaml"]
    remote = ws / ".qlora-ops" / "dvc-remote"
    assert lock_md5s(ws, "prepare") | lock_md5s(ws, "sample") <= remote_md5s(remote)  # upstream sample too


def test_a_truncated_prepared_split_is_rebuilt_by_the_next_prepare(tmp_path):
    """A split damaged on disk after it was versioned is not trained or scored on: DVC sees the output
    differ from dvc.lock, the next prepare rebuilds it, byte for byte, under the same data version."""
    ws = make_workspace(tmp_path / "ws")
    pfile = ws / "params" / "default.yaml"
    first = prepare_via_dvc(ws, pfile, load_params(pfile))
    test = Path(first["prepared_dir"]) / "test.jsonl"
    good = test.read_bytes()
    test.write_bytes(good[: len(good) // 3])  # cut mid-row, as a full disk or a bad copy leaves it
    again = prepare_via_dvc(ws, pfile, load_params(pfile))
    assert test.read_bytes() == good
    assert again["data_version"] == first["data_version"]


def test_source_params_are_checked_before_any_work(tmp_path):
    ws, drops = workspace_with_drops(tmp_path, **{"a.jsonl": drop_rows(0, 40)})
    cases = [({"source": str(drops)}, "built-in sample"),  # data.raw left at the sample path
             ({"source": str(drops), "raw": "data/raw/mine.jsonl"}, "looks like a file"),
             ({"source": str(drops), "raw": "../outside"}, "inside the workspace"),
             ({"source": str(tmp_path / "nope"), "raw": "data/raw/x"}, "not found")]
    for data, expect in cases:
        p = write_params(ws, "bad", data=data)
        with pytest.raises(ParamsError) as e:
            prepare_via_dvc(ws, p, load_params(p))
        msg = str(e.value)
        assert expect in msg and str(p) in msg and "data." in msg, msg
    assert not (ws / "data" / "raw" / "x").exists() and "prepare-bad" not in (ws / "dvc.yaml").read_text()
    # a relative local source is relative to the workspace
    shutil.copytree(drops, ws / "incoming")
    p = write_params(ws, "rel", data={"source": "incoming", "raw": "data/raw/rel", "prepared": "data/prepared/rel"})
    assert prepare_via_dvc(ws, p, load_params(p))["source"]["files"] == ["a.jsonl"]


def test_bad_rows_in_a_drop_are_quarantined_naming_file_and_row(tmp_path):
    ws, drops = workspace_with_drops(tmp_path, **{"a.jsonl": drop_rows(0, 40),
                                                  "b.csv": "instruction,input,output\nQ,x,a\nQ,y,\n"})
    p = write_params(ws, "d", data={"source": str(drops), "raw": "data/raw/d", "prepared": "data/prepared/d"})
    res = prepare_via_dvc(ws, p, load_params(p))  # the bad drop is set aside; the run goes on with a.jsonl
    [q] = res["source"]["quarantined"]
    assert q["name"] == "b.csv" and "data/raw/d/b.csv:2" in q["reason"] and '"output" must be a non-empty string' in q["reason"]
    assert res["source"]["files"] == ["a.jsonl"] and not (drops / "b.csv").exists()
    assert "b.csv:2" in (tmp_path / "quarantine" / "b.csv.reason.txt").read_text()


def test_configure_remote_touches_config_only_when_it_differs(tmp_path, monkeypatch):
    ws = make_workspace(tmp_path / "ws")
    calls = []
    real = versioning.dvc

    def spy(workspace, *args):
        calls.append(args)
        return real(workspace, *args)

    monkeypatch.setattr(versioning, "dvc", spy)
    params = load_params(write_params(ws, "r", storage={"dvc_remote": str(tmp_path / "team-remote"),
                                                        "dvc_remote_options": {"verify": "true"}}))
    assert configure_remote(ws, params) == str((tmp_path / "team-remote").resolve())
    assert (tmp_path / "team-remote").is_dir()  # a directory remote is created
    assert [c[:2] for c in calls] == [("remote", "add"), ("remote", "modify")]
    calls.clear()
    configure_remote(ws, params)
    assert calls == []  # unchanged: no DVC process at all
    cfg = (ws / ".dvc" / "config.local").read_text()
    assert "verify = true" in cfg and "remote = qlora-ops" in cfg
    # back to the default: <state_dir>/dvc-remote
    configure_remote(ws, load_params(write_params(ws, "r2", state_dir="state")))
    assert str((ws / "state" / "dvc-remote").resolve()) in (ws / ".dvc" / "config.local").read_text()
    # an option DVC does not know is refused naming the key (never echoing the value: it may be a secret)
    bad = load_params(write_params(ws, "r3", storage={"dvc_remote_options": {"no_such_option": "hunter2"}}))
    with pytest.raises(ParamsError) as e:
        configure_remote(ws, bad)
    assert "storage.dvc_remote_options.no_such_option" in str(e.value) and "hunter2" not in str(e.value)


# ---------------------------------------------------------------- S3 source + S3 remote on moto
@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with start_moto(tmp_path_factory.mktemp("moto")) as endpoint:
        make_bucket(endpoint, BUCKET)
        yield endpoint


def test_s3_source_and_s3_remote(s3, tmp_path, monkeypatch):
    import boto3

    for k, v in S3_ENV.items():  # credentials only from the environment, for s3fs and for DVC
        monkeypatch.setenv(k, v)
    c = boto3.client("s3", endpoint_url=s3, region_name="us-east-1")
    c.put_object(Bucket=BUCKET, Key="drops/week-01.jsonl", Body=drop_rows(0, 60).encode())
    ws = make_workspace(tmp_path / "ws")
    raw = "data/raw/team"
    write_params(ws, "team", data={"source": f"s3://{BUCKET}/drops/", "source_options": {"endpoint_url": s3},
                                   "raw": raw, "prepared": "data/prepared/team"},
                 storage={"dvc_remote": f"s3://{BUCKET}/dvc", "dvc_remote_options": {"endpointurl": s3}})

    def remote_keys() -> set[str]:
        pages = c.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="dvc/files/md5/")
        return {o["Key"].split("/")[-2] + o["Key"].split("/")[-1] for pg in pages for o in pg.get("Contents", [])}

    r1 = run(ws, "team")
    assert r1["remote"] == f"s3://{BUCKET}/dvc" and r1["pushed"] == 8 and r1["source"]["added"] == ["week-01.jsonl"]
    assert lock_md5s(ws, "prepare-team") | {dvc_file_md5(ws, f"{raw}.dvc")} <= remote_keys()
    v1 = save_version(ws, r1, raw)

    r2 = run(ws, "team")
    assert r2["data_version"] == r1["data_version"] and r2["pushed"] == 0 and r2["source"]["copied_bytes"] == 0

    c.put_object(Bucket=BUCKET, Key="drops/week-02.jsonl", Body=drop_rows(60, 40).encode())
    r3 = run(ws, "team")
    assert r3["data_version"] != r1["data_version"] and r3["source"]["added"] == ["week-02.jsonl"]
    assert dvc_file_md5(ws, f"{raw}.dvc") in remote_keys()

    shutil.rmtree(ws / ".dvc" / "cache")
    pull_into_fresh_clone(ws, tmp_path / "clone-v1", v1, "prepare-team", raw, f"s3://{BUCKET}/dvc", endpointurl=s3)
    pull_into_fresh_clone(ws, tmp_path / "clone-v3", save_version(ws, r3, raw), "prepare-team", raw,
                          f"s3://{BUCKET}/dvc", endpointurl=s3)


def test_unreachable_remote_is_a_connection_error_and_the_next_run_pushes(s3, tmp_path, monkeypatch):
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    ws, drops = workspace_with_drops(tmp_path, **{"a.jsonl": drop_rows(0, 40)})
    data = {"source": str(drops), "raw": "data/raw/u", "prepared": "data/prepared/u"}
    # An HTTP remote that is down (credentials in a params URL are refused at load: tests/integration/test_secrets.py)
    dead = f"http://127.0.0.1:{free_port()}/dvc"
    write_params(ws, "u", data=data, storage={"dvc_remote": dead})
    with pytest.raises(ConnectionError) as e:  # builtin: the flow retries it as a transient fault
        run(ws, "u")
    assert "http://127.0.0.1" in str(e.value) and "next run pushes it" in str(e.value)
    write_params(ws, "u", data=data, storage={"dvc_remote": f"s3://{BUCKET}/u", "dvc_remote_options": {"endpointurl": s3}})
    res = run(ws, "u")  # the remote is back: everything versioned meanwhile is pushed now
    assert not res["reran"] and res["pushed"] == 8


def test_a_prepare_stage_written_before_the_stage_packages_is_rewritten_and_runs(tmp_path):
    """A workspace whose dvc.yaml holds a prepare stage of the old layout (`python -m tasks.data`, deps on
    tasks/data.py and tasks/config.py, which no longer exist): the next run rewrites that stage once and
    prepares; DVC alone would refuse the missing dependencies."""
    ws, drops = workspace_with_drops(tmp_path, **{"week-01.jsonl": drop_rows(0, 40)})
    raw = "data/raw/drops"
    write_params(ws, "old", data={"source": str(drops), "raw": raw, "prepared": "data/prepared/old"})
    spec = yaml.safe_load((ws / "dvc.yaml").read_text())
    spec["stages"]["prepare-old"] = {"cmd": "python -m tasks.data prepare --params params/old.yaml",
                                     "deps": ["tasks/data.py", "tasks/config.py", raw],
                                     "params": [{"params/old.yaml": ["data"]}], "outs": ["data/prepared/old"]}
    (ws / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    r = run(ws, "old")
    assert r["reran"] and (ws / "data" / "prepared" / "old" / "test.jsonl").is_file()
    stage = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]["prepare-old"]
    assert stage["cmd"] == "python -m qlora_ops.tasks.data prepare --params params/old.yaml"
    assert "tasks/data.py" not in stage["deps"] and "tasks/data/prepare.py" in stage["deps"]


def test_the_lineage_outlives_the_checkout_and_a_new_lineage_resplits_through_dvc(tmp_path):
    """The live lineage is in the state dir, the copy beside data.prepared is a plain DVC output: a checkout
    that loses data/ (a rebuilt container whose state volume stayed) gets its splits back from the run
    cache with the lineage intact; `data new-lineage` re-splits although DVC sees no changed input; a
    workspace of the release that kept the live file beside data.prepared (a `persist` output) adopts it."""
    from qlora_ops.tasks.data import lineage

    ws, drops = workspace_with_drops(tmp_path, **{"week-01.jsonl": drop_rows(0, 60)})
    write_params(ws, "lin", data={"source": str(drops), "raw": "data/raw/lin", "prepared": "data/prepared/lin"})
    p = load_params(ws / "params" / "lin.yaml")
    first = run(ws, "lin")
    live, copy = lineage.lineage_path(ws, p), lineage.copy_path(ws, p.data)
    assert live.is_file() and copy.is_file() and live.is_relative_to(ws / ".qlora-ops")
    stage = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"][first["stage"]]
    assert "data/prepared/lin.lineage.json" in stage["outs"]  # a plain output: the run cache serves it
    tested = {k for k, r in lineage.load(live)["rows"].items() if r["split"] == "test"}

    shutil.rmtree(ws / "data" / "prepared")
    again = run(ws, "lin")
    assert not again["reran"] and again["data_version"] == first["data_version"]
    assert {k for k, r in lineage.load(live)["rows"].items() if r["split"] == "test"} == tested

    lineage.new_lineage(live, "test")
    fresh = run(ws, "lin")
    assert fresh["reran"]
    assert json.loads((ws / "data" / "prepared" / "lin" / "stats.json").read_text())["lineage"] == 2

    # the previous release: the live file beside data.prepared, a persist output, no state-dir file
    spec = yaml.safe_load((ws / "dvc.yaml").read_text())
    spec["stages"][first["stage"]]["outs"] = ["data/prepared/lin", {"data/prepared/lin.lineage.json": {"persist": True}}]
    (ws / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    old = lineage.load(live)
    live.unlink()
    (drops / "week-02.jsonl").write_text(drop_rows(60, 20))
    upgraded = run(ws, "lin")
    assert upgraded["reran"]
    lin = lineage.load(live)
    assert lin["lineage"] == 2 and set(old["trained"]) <= set(lin["trained"])
    assert "data/prepared/lin.lineage.json" in yaml.safe_load((ws / "dvc.yaml").read_text())["stages"][first["stage"]]["outs"]
