"""Bad input fuzz (issue 10, item 5): whatever bytes land in a raw data file or a params file, the result
is a clean load or ONE error of the documented type naming where it is (file:line / file:row, or the
params key) -- never another exception type, which the CLI would turn into exit 5 and a traceback.

Function level with many hypothesis examples (no model, no network: fast), then a fixed sample of bad
files through the real `qlora-ops run` on a tiny workspace: exit 2, one error naming file:line or the key,
no traceback, nothing registered.
"""
from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qlora_ops.tasks.core.config import DataParams, Params, ParamsError, SplitParams, load_params
from qlora_ops.tasks.data.prepare import DataError, load_raw, prepare

# Function-level fuzzing: each example touches a few small files; 150-300 examples run in seconds.
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])
KEYS = ("instruction", "input", "output")

# JSON values of every type, including the ones a careless validator would pass through (nested, NaN, huge).
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3), max_leaves=8)
good_row = st.fixed_dictionaries({"instruction": st.text(min_size=1, max_size=30).filter(str.strip),
                                  "output": st.sampled_from(["a", "b", "c"])},
                                 optional={"input": st.text(max_size=40)})
bad_row = st.dictionaries(st.sampled_from(KEYS + ("extra",)), json_values, max_size=4)
jsonl_line = st.one_of(
    good_row.map(json.dumps), bad_row.map(lambda d: json.dumps(d, allow_nan=True)), json_values.map(json.dumps),
    st.text(max_size=40),  # not JSON at all
    st.binary(max_size=20).map(lambda b: b.decode("latin-1")),
)


def _where_ok(msg: str, path: Path) -> bool:
    """The error names the file, and every listed problem names file:n (or the file itself)."""
    if str(path) not in msg:
        return False
    listed = [l.strip() for l in msg.splitlines()[1:] if l.strip() and not l.strip().startswith("...")]
    return all(re.match(rf"{re.escape(str(path))}(:\d+)?: ", l) for l in listed)


def _load_one(path: Path) -> list[dict] | DataError:
    try:
        rows = load_raw(path)
    except DataError as e:  # any other exception type fails the test: that is the point
        assert _where_ok(str(e), path), str(e)
        return e
    for r in rows:  # a clean load is really clean: every row has the documented shape
        assert isinstance(r["instruction"], str) and r["instruction"].strip()
        assert isinstance(r["output"], str) and r["output"].strip() and isinstance(r["input"], str)
        assert r["file"] == str(path) and r["line"] >= 1
    return rows


@FAST
@given(lines=st.lists(jsonl_line, max_size=12), raw_tail=st.binary(max_size=16))
@example(lines=["[" * 5000 + "]" * 5000], raw_tail=b"")  # nesting deeper than Python's recursion limit
@example(lines=['{"instruction": "x", "output": "a"}'], raw_tail=b"\xff\xfe\n")  # valid row, then not UTF-8
@example(lines=['{"instruction": NaN, "output": Infinity}'], raw_tail=b"")
def test_fuzzed_jsonl_loads_or_names_file_and_line(tmp_path_factory, lines, raw_tail):
    path = tmp_path_factory.mktemp("j") / "raw.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + b"\n" + raw_tail)
    _load_one(path)


cell = st.one_of(st.text(max_size=15), st.sampled_from(["", " ", "a", "b", '"', ",", "\n", "\r\n", "nan", "NULL"]))


@FAST
@given(header=st.lists(st.sampled_from(KEYS + ("x", "", "instruction")), max_size=5),
       rows=st.lists(st.lists(cell, max_size=6), max_size=8), raw=st.booleans(), junk=st.binary(max_size=12))
@example(header=["instruction", "output"], rows=[["q", "a", "extra cell"]], raw=False, junk=b"")  # longer than header
@example(header=["instruction", "output"], rows=[["q", "a"]], raw=True, junk=b"\xff")
def test_fuzzed_csv_loads_or_names_file_and_row(tmp_path_factory, header, rows, raw, junk):
    path = tmp_path_factory.mktemp("c") / "raw.csv"
    buf = io.StringIO()
    if raw:  # hand-joined, so quotes, separators and line breaks land unescaped
        buf.write(",".join(header) + "\n" + "\n".join(",".join(r) for r in rows))
    else:
        w = csv.writer(buf)
        w.writerow(header)
        w.writerows(rows)
    path.write_bytes(buf.getvalue().encode("utf-8", "surrogatepass") + junk)
    _load_one(path)


@settings(max_examples=40, deadline=None)
@given(cols=st.dictionaries(st.sampled_from(KEYS + ("x",)),
                            st.sampled_from(["str", "int", "float", "null", "list", "empty"]), max_size=4),
       n=st.integers(0, 4))
def test_fuzzed_parquet_loads_or_names_file_and_row(tmp_path_factory, cols, n):
    import pyarrow as pa
    import pyarrow.parquet as pq

    make = {"str": lambda i: f"v{i % 2}", "int": lambda i: i, "float": lambda i: i / 2, "null": lambda i: None,
            "list": lambda i: [i], "empty": lambda i: ""}
    path = tmp_path_factory.mktemp("p") / "raw.parquet"
    pq.write_table(pa.table({c: [make[k](i) for i in range(n)] for c, k in cols.items()} or {"x": [1] * n}), path)
    _load_one(path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(st.tuples(st.sampled_from(["a.jsonl", "b.csv", "sub/c.jsonl", "_skip.csv", ".tmp.jsonl"]),
                                st.lists(jsonl_line, max_size=4)), max_size=4, unique_by=lambda f: f[0]))
def test_fuzzed_directory_loads_or_names_each_file_and_line(tmp_path_factory, files):
    """A data.source snapshot: several files of both kinds; every listed problem names its own file:n."""
    d = tmp_path_factory.mktemp("dir") / "raw"
    d.mkdir()
    for name, lines in files:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + b"\n")
    try:
        rows = load_raw(d)
    except DataError as e:
        msg = str(e)
        assert msg.startswith(f"{d}"), msg
        for line in msg.splitlines()[1:]:
            line = line.strip()
            if line and not line.startswith("..."):
                assert re.match(rf"{re.escape(str(d))}/[^:]+\.(jsonl|csv)(:\d+)?: ", line), msg
        return
    assert rows and all(Path(r["file"]).parent.is_relative_to(d) for r in rows)
    assert not any(Path(r["file"]).name.startswith(("_", ".")) for r in rows)  # not data: never read


def test_garbage_parquet_is_one_error_naming_the_file(tmp_path):
    path = tmp_path / "raw.parquet"
    path.write_bytes(b"PAR1 not really parquet")
    assert isinstance(_load_one(path), DataError)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.sampled_from(["Label?", "Label? ", "Other"]), st.integers(0, 30),
                               st.sampled_from(["a", "b"])), max_size=60),
       test=st.sampled_from([0.1, 0.2, 0.45]), dedupe=st.booleans(), max_chars=st.sampled_from([16, 400]))
def test_fuzzed_prepare_writes_splits_or_names_the_file(tmp_path_factory, rows, test, dedupe, max_chars):
    """Duplicates, conflicts, tiny data, truncation collisions: prepare writes every split or raises one
    DataError naming the raw file (conflicts name both file:line)."""
    d = tmp_path_factory.mktemp("prep")
    raw = d / "raw.jsonl"
    raw.write_text("".join(json.dumps({"instruction": i, "input": f"example {'x' * 20} {n}", "output": o}) + "\n"
                           for i, n, o in rows))
    p = Params(data=DataParams(raw=str(raw), prepared=str(d / "out"), dedupe=dedupe, max_input_chars=max_chars,
                               split=SplitParams(test=test, val=0.1)))
    try:
        stats = prepare(p, d)
    except DataError as e:
        assert str(raw) in str(e)
        if "conflicting" in str(e):
            assert re.search(rf"{re.escape(str(raw))}:\d+ and {re.escape(str(raw))}:\d+", str(e)), str(e)
        assert not (d / "out" / "train.jsonl").exists()  # nothing written on a refusal
        return
    assert stats["train"] >= 8 and stats["val"] and stats["test"]
    assert all((d / "out" / f"{s}.jsonl").is_file() for s in ("train", "val", "test"))


# ---------------------------------------------------------------- params files
SECTIONS = {name: list(f.annotation.model_fields) for name, f in Params.model_fields.items()
            if hasattr(f.annotation, "model_fields")}
yaml_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True),
                        st.text(max_size=12), st.sampled_from(["2001-13-01", "1e999", "~", "yes", ".inf", "0x1F"]))
yaml_value = st.recursive(yaml_scalar, lambda k: st.lists(k, max_size=2) | st.dictionaries(st.text(max_size=6), k, max_size=2),
                          max_leaves=4)
section = st.sampled_from(sorted(SECTIONS)).flatmap(
    lambda s: st.tuples(st.just(s), st.dictionaries(st.sampled_from(SECTIONS[s] + ["typo_key"]), yaml_value, max_size=3)))
params_doc = st.dictionaries(st.sampled_from(sorted(Params.model_fields) + ["bogus"]), yaml_value, max_size=2) | \
    st.lists(section, max_size=3).map(dict)


def _check_params(path: Path) -> None:
    try:
        p = load_params(path)
    except ParamsError as e:  # anything else fails the test
        msg = str(e)
        assert msg.startswith(f"{path}:"), msg
        if "invalid params" in msg:  # every problem line names its key (dotted path)
            for line in msg.splitlines()[1:]:
                assert re.match(r"  \S.*?: ", line), msg
        return
    assert isinstance(p, Params)


@FAST
@given(doc=params_doc)
def test_fuzzed_params_mapping_loads_or_names_the_key(tmp_path_factory, doc):
    path = tmp_path_factory.mktemp("pp") / "params.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    _check_params(path)


@FAST
@given(text=st.text(max_size=60), junk=st.binary(max_size=8))
@example(text="seed: 2001-13-01\n", junk=b"")  # YAML timestamp with month 13: PyYAML raises ValueError
@example(text="seed: 1\n", junk=b"\xff\xfe")  # not UTF-8
@example(text="a: &x [*x]\nseed: *x\n", junk=b"")  # a self-referencing structure
@example(text="data:\n  raw: !!binary x\n", junk=b"")
@example(text="training: {max_steps: 2001-01-01}\n", junk=b"")
def test_fuzzed_params_text_loads_or_names_the_file(tmp_path_factory, text, junk):
    path = tmp_path_factory.mktemp("pt") / "params.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass") + junk)
    _check_params(path)


# ---------------------------------------------------------------- the real CLI on a sample of bad inputs
# file body -> what the error must name. (A plain missing key through the CLI is
# tests/integration/test_flow.py::test_bad_data_fails_before_training_naming_file_and_line.)
BAD_DATA = {
    "deep.jsonl": ("[" * 5000 + "]" * 5000 + "\n", ":1"),
    "short.csv": ('instruction,output\n"Q?",a\n"Q2?",\n', ":2"),
}
BAD_PARAMS = {
    "date.yaml": ("seed: 2001-13-01\n", "date.yaml"),
    "typo.yaml": ("training:\n  max_stepz: 3\n", "training.max_stepz"),
}


@pytest.fixture(scope="module")
def cli_ws(tmp_path_factory):
    from tests.conftest import make_workspace

    return make_workspace(tmp_path_factory.mktemp("fuzz-ws") / "repo")


def _cli(ws: Path, params_rel: str) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    env.update(PYTHONPATH=str(ws), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_HOME=str(ws / ".prefect-home"))
    return subprocess.run([sys.executable, "-m", "qlora_ops.flows.cli", "run", "--params", params_rel, "--workspace", str(ws)],
                          cwd=ws, env=env, capture_output=True, text=True, timeout=600)


def _no_registered_model(ws: Path) -> None:
    db = ws / ".qlora-ops" / "mlflow.db"
    if not db.exists():
        return  # no store at all: certainly nothing registered
    import sqlite3

    with sqlite3.connect(db) as c:
        have = {r[0] for r in c.execute("select name from sqlite_master where type='table'")}
        if "model_versions" in have:
            assert c.execute("select count(*) from model_versions").fetchone()[0] == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_cli_bad_data_exits_2_naming_file_and_line(cli_ws, tiny_model_dir, name):
    body, where = BAD_DATA[name]
    raw = cli_ws / "data" / "raw" / name
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(body)
    stem = Path(name).stem
    p = {"model": {"source": str(tiny_model_dir), "max_seq_len": 96},
         "data": {"raw": f"data/raw/{name}", "prepared": f"data/prepared/fz-{stem}"}}
    (cli_ws / "params" / f"fz-{stem}.yaml").write_text(yaml.safe_dump(p))
    r = _cli(cli_ws, f"params/fz-{stem}.yaml")
    err = r.stderr
    assert r.returncode == 2, r.stdout[-2000:] + err[-3000:]
    assert "Traceback" not in r.stdout + err
    lines = [l for l in err.splitlines() if l.startswith("qlora-ops: ")]
    assert len(lines) == 1, err[-3000:]  # ONE error, then the listed lines under it
    assert f"data/raw/{name}{where}" in err, err[-3000:]
    _no_registered_model(cli_ws)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BAD_PARAMS))
def test_cli_bad_params_exits_2_naming_the_key(cli_ws, name):
    body, named = BAD_PARAMS[name]
    (cli_ws / "params" / name).write_text(body)
    r = _cli(cli_ws, f"params/{name}")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("qlora-ops: ")]
    assert len(lines) == 1 and named in r.stderr, r.stderr[-3000:]
    _no_registered_model(cli_ws)
