"""eval.suites: validated before any work (names, metric, role, source, each naming the key and the fix);
their rows read exactly like the raw data; their content in the fingerprint."""
from __future__ import annotations

import json

import pytest

from qlora_ops.tasks.model import keys
from qlora_ops.tasks.evaluate import suites
from qlora_ops.tasks.core.config import Params, ParamsError, load_params
from qlora_ops.tasks.data.prepare import DataError


def _params_file(tmp_path, suites_yaml: str):
    f = tmp_path / "p.yaml"
    f.write_text("eval:\n  suites:\n" + suites_yaml)
    return f


@pytest.mark.parametrize("suites_yaml, says", [
    ("    - {name: g, path: a.jsonl}\n    - {name: g, path: b.jsonl}\n", "rename 'g'"),
    ("    - {name: test, path: a.jsonl}\n", "'test'"),
    ("    - {name: g, path: a.jsonl, metric: bleu}\n", "exact_match"),
    ("    - {name: g, path: a.jsonl, role: must_improve}\n", "gain"),
    ("    - {name: g, path: a.jsonl, role: non_inferior, threshold: -0.1}\n", "margin"),
    ("    - {name: g}\n", "exactly one of `path`"),
    ("    - {name: 'bad name', path: a.jsonl}\n", "eval.suites.0.name"),
])
def test_bad_suites_are_refused_naming_the_key_and_the_fix(tmp_path, suites_yaml, says):
    f = _params_file(tmp_path, suites_yaml)
    msg = str(pytest.raises(ParamsError, load_params, f).value)
    assert str(f) in msg and "eval.suites" in msg and says in msg, msg


def test_a_missing_suite_file_is_named_before_any_work(tmp_path):
    f = _params_file(tmp_path, "    - {name: general, path: data/suites/nope.jsonl, role: non_inferior, threshold: 0.05}\n")
    p = load_params(f)
    msg = str(pytest.raises(ParamsError, suites.check, p, tmp_path, f).value)
    assert f"{f}: eval.suites[0] (general).path='data/suites/nope.jsonl'" in msg and "point it at" in msg


def _rows(n: int) -> str:
    return "".join(json.dumps({"instruction": "Say it.", "input": f"thing {i}", "output": f"answer {i}"}) + "\n"
                   for i in range(n))


def test_suite_rows_are_read_like_the_data_and_hashed_into_the_fingerprint(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "general.jsonl").write_text(_rows(5))
    (tmp_path / "s" / "chat.jsonl").write_text(json.dumps({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."}]}) + "\n")
    p = Params(data={"system_prompt": "Domain prompt."}, eval={"suites": [
        {"name": "general", "path": "s/general.jsonl", "max_examples": 3, "system_prompt": "Suite prompt."},
        {"name": "chat", "path": "s/chat.jsonl"}]})
    d, hashes = suites.prepare(p, tmp_path)
    general = [json.loads(x) for x in (d / "general.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in general] == ["answer 0", "answer 1", "answer 2"]  # max_examples
    assert general[0]["prompt"] == "Say it.\n\nthing 0" and general[0]["system"] == "Suite prompt."
    chat = json.loads((d / "chat.jsonl").read_text())
    assert chat["system"] == "Be brief." and chat["completion"] == "Hello."  # a chat row's own system turn wins
    assert hashes == {n: keys.rows_hash(d / f"{n}.jsonl") for n in ("general", "chat")}
    assert suites.prepare(p, tmp_path) == (d, hashes)  # the same rows, the same content-addressed dir

    fp = keys.fingerprint("v", p, "b", hashes)
    (tmp_path / "s" / "general.jsonl").write_text(_rows(5).replace("answer 1", "answer one"))
    d2, h2 = suites.prepare(p, tmp_path)
    assert h2["general"] != hashes["general"] and h2["chat"] == hashes["chat"] and d2 != d
    assert keys.fingerprint("v", p, "b", h2) != fp


def test_a_bad_suite_row_is_named_with_file_and_line(tmp_path):
    (tmp_path / "g.jsonl").write_text(_rows(2) + json.dumps({"instruction": "Say it.", "input": "x"}) + "\n")
    p = Params(eval={"suites": [{"name": "general", "path": "g.jsonl"}]})
    msg = str(pytest.raises(DataError, suites.prepare, p, tmp_path).value)
    assert "g.jsonl:3" in msg and "output" in msg
