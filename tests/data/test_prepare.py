"""Data stage: the stdlib sample is real and fair, bad rows fail loudly with file:line, splits are stable."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tasks.config import DataParams, Params
from tasks.data import SAMPLE_MODULES, DataError, build_sample, load_raw, prepare, read_split
from tests.conftest import ROOT


def write(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def params_for(tmp_path: Path, **data) -> Params:
    return Params(data=DataParams(raw=str(tmp_path / "raw.jsonl"), prepared=str(tmp_path / "prepared"), **data))


def row(i: int, label: str = "a") -> dict:
    return {"instruction": "Label?", "input": f"example number {i}", "output": label}


def test_sample_is_deterministic_balanced_and_does_not_leak_labels(tmp_path):
    n = build_sample(tmp_path / "a.jsonl")
    build_sample(tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    rows = load_raw(tmp_path / "a.jsonl")
    counts = Counter(r["output"] for r in rows)
    assert len(counts) == len(SAMPLE_MODULES) >= 8 and len(set(counts.values())) == 1 and n == len(rows)
    assert not [r for r in rows if r["output"] in r["input"].lower()]
    assert len({r["input"] for r in rows}) == len(rows)


def test_bad_lines_are_all_reported_with_file_and_line(tmp_path):
    f = write(tmp_path / "raw.jsonl", [row(1), "{not json", {"instruction": "x", "input": "y"},
                                       {"instruction": "x", "input": 3, "output": "o"}, [1, 2], "", row(2)])
    with pytest.raises(DataError) as e:
        load_raw(f)
    msg = str(e.value)
    assert f"{f}:2: not valid JSON" in msg
    assert f'{f}:3: missing "output"' in msg
    assert f'{f}:4: "input" must be a string' in msg
    assert f"{f}:5: a JSON list" in msg
    assert "4 bad line(s)" in msg and "README" in msg


def test_empty_and_missing_files(tmp_path):
    write(tmp_path / "raw.jsonl", [""])
    assert "empty" in str(pytest.raises(DataError, load_raw, tmp_path / "raw.jsonl").value)
    assert "not found" in str(pytest.raises(DataError, load_raw, tmp_path / "nope.jsonl").value)


def test_duplicates_dropped_and_counted_conflicts_fail(tmp_path):
    rows = [row(i, "ab"[i % 2]) for i in range(40)]
    write(tmp_path / "raw.jsonl", rows + [row(3, "b"), row(5, "b")])
    stats = prepare(params_for(tmp_path), tmp_path)
    assert stats["duplicates_dropped"] == 2 and stats["rows_after_dedupe"] == 40
    write(tmp_path / "raw.jsonl", rows + [row(4, "b")])  # row 4 is "a" on line 5
    msg = str(pytest.raises(DataError, prepare, params_for(tmp_path), tmp_path).value)
    assert f"{tmp_path / 'raw.jsonl'}:5 and {tmp_path / 'raw.jsonl'}:41" in msg


def test_split_is_deterministic_and_stable_when_rows_are_added(tmp_path):
    write(tmp_path / "raw.jsonl", [row(i) for i in range(200)])
    p = params_for(tmp_path)
    prepare(p, tmp_path)
    first = {s: {r["prompt"] for r in read_split(tmp_path / "prepared" / f"{s}.jsonl")} for s in ("train", "val", "test")}
    assert all(first.values()) and 20 < len(first["test"]) < 60
    write(tmp_path / "raw.jsonl", [row(i) for i in range(300)])
    prepare(p, tmp_path)
    second = {s: {r["prompt"] for r in read_split(tmp_path / "prepared" / f"{s}.jsonl")} for s in ("train", "val", "test")}
    for s in first:
        assert first[s] <= second[s]  # no old row changed split
    one = read_split(tmp_path / "prepared" / "train.jsonl")[0]
    assert set(one) == {"id", "system", "prompt", "completion"} and one["prompt"].startswith("Label?\n\n")


def test_too_little_data_says_what_to_change(tmp_path):
    write(tmp_path / "raw.jsonl", [row(i) for i in range(3)])
    msg = str(pytest.raises(DataError, prepare, params_for(tmp_path), tmp_path).value)
    assert "data.split" in msg and "add data" in msg


def test_cli_exits_2_with_a_clean_message(tmp_path):
    write(tmp_path / "raw.jsonl", [row(1), '{"instruction": "x"}'])
    pf = tmp_path / "p.yaml"
    pf.write_text(f"data:\n  raw: {tmp_path / 'raw.jsonl'}\n  prepared: {tmp_path / 'out'}\n")
    r = subprocess.run([sys.executable, "-m", "tasks.data", "prepare", "--params", str(pf)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "raw.jsonl:2: missing \"output\"" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written
