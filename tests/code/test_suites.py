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
    ("    - {name: g, path: a.jsonl, role: report}\n    - {name: g, path: b.jsonl, role: report}\n", "rename 'g'"),
    ("    - {name: test, path: a.jsonl, role: report}\n", "'test'"),
    ("    - {name: g, path: a.jsonl, metric: bleu, role: report}\n", "exact_match"),
    # issue 26: a threshold without a role silently became `report` (never gated)
    ("    - {name: g, path: a.jsonl, threshold: 0.05}\n", "`role` is required"),
    ("    - {name: g, path: a.jsonl, role: must_improve}\n", "gain"),
    ("    - {name: g, path: a.jsonl, role: non_inferior, threshold: -0.1}\n", "margin"),
    ("    - {name: g}\n", "exactly one of `path`"),
    ("    - {name: 'bad name', path: a.jsonl, role: report}\n", "eval.suites.0.name"),
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
        {"name": "general", "path": "s/general.jsonl", "max_examples": 3, "system_prompt": "Suite prompt.",
         "role": "report"},
        {"name": "chat", "path": "s/chat.jsonl", "role": "report"}]})
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
    p = Params(eval={"suites": [{"name": "general", "path": "g.jsonl", "role": "report"}]})
    msg = str(pytest.raises(DataError, suites.prepare, p, tmp_path).value)
    assert "g.jsonl:3" in msg and "output" in msg


# ---------------------------------------------------------------- lm-eval suites: checked and staged before any work
GEN = ("task: t_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
       "output_type: {out}\ndoc_to_text: \"{{{{q}}}}\"\ndoc_to_target: \"{{{{a}}}}\"\n"
       "filter_list:\n  - {{name: strict, filter: [{{function: take_first}}]}}\n"
       "  - {{name: loose, filter: [{{function: take_first}}]}}\n"
       "metric_list:\n  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}\n")


def _task(folder, name="gen", data="data/qa.jsonl", out="generate_until"):
    folder.mkdir(parents=True, exist_ok=True)
    f = folder / f"{name}.yaml"
    f.write_text(GEN.format(name=name, data=data, out=out))
    return f


def _lm_params(tmp_path, task_file, **suite):
    return Params(eval={"suites": [{"name": "lm", "lm_eval": str(task_file), "role": "report", **suite}]})


def _qa(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"q": "Which module parses JSON?", "a": "json"}) + "\n")


@pytest.mark.parametrize("yaml_text, suite, says", [
    ("task: t\n  bad: [indent\n", {}, "not a valid lm-eval task YAML"),  # the old check read only that it exists
    ("task: t\ndataset_path: gsm8k\noutput_type: generate_until\n", {}, "hub dataset"),
    (None, {"metric": "nll"}, "likelihood"),
    (None, {"metric": "lm_eval.acc_norm"}, "not a per-document metric"),
    (None, {"filter": "flexible"}, "strict, loose"),
])
def test_check_refuses_lm_eval_suites_it_cannot_run_with_exit_2(tmp_path, yaml_text, suite, says):
    from qlora_ops.flows.cli.exit_codes import EXIT, classify

    _qa(tmp_path / "data" / "qa.jsonl")
    f = _task(tmp_path)
    if yaml_text is not None:
        f.write_text(yaml_text)
    p = _lm_params(tmp_path, f, **suite)
    err = pytest.raises(ParamsError, suites.check, p, tmp_path, tmp_path / "p.yaml").value
    assert says in str(err) and "eval.suites[0] (lm).lm_eval" in str(err), err
    assert EXIT[classify(err)] == 2  # bad input, not 5 (SuiteError was a ValueError)


def test_check_refuses_a_multiple_choice_suite_scored_on_text(tmp_path):
    _qa(tmp_path / "data" / "qa.jsonl")
    p = _lm_params(tmp_path, _task(tmp_path, out="multiple_choice"), metric="rouge_l")
    with pytest.raises(ParamsError, match="multiple_choice"):
        suites.check(p, tmp_path, tmp_path / "p.yaml")


def test_check_looks_for_the_harness_not_our_module(tmp_path, monkeypatch):
    import sys

    _qa(tmp_path / "data" / "qa.jsonl")
    p = _lm_params(tmp_path, _task(tmp_path))
    suites.check(p, tmp_path, tmp_path / "p.yaml")  # installed: fine
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # how Python marks a package as not importable
    with pytest.raises(ParamsError, match="lm-evaluation-harness .the `lm_eval` package."):
        suites.check(p, tmp_path, tmp_path / "p.yaml")


def test_every_file_an_lm_eval_suite_reads_is_copied_and_hashed(tmp_path):
    """An absolute data file was neither copied nor hashed (the hash stayed when it changed), and two suites
    of one folder shared a hash."""
    outside = tmp_path / "elsewhere" / "qa.jsonl"
    _qa(outside)
    _qa(tmp_path / "suite" / "data" / "qa.jsonl")
    a = _task(tmp_path / "suite", "a", data=str(outside))
    b = _task(tmp_path / "suite", "b")
    p = Params(eval={"suites": [{"name": "a", "lm_eval": str(a), "role": "report"},
                                {"name": "b", "lm_eval": str(b), "role": "report"}]})
    d, h = suites.prepare(p, tmp_path)
    assert h["a"] != h["b"]
    assert h == {s.name: keys.rows_hash(suites.hashed(d, s)) for s in p.eval.suites}  # what the model stage checks
    from qlora_ops.tasks.evaluate.lm_eval_suite import load_task

    copied = load_task(suites.rows_path(d, p.eval.suites[0]))["dataset_kwargs"]["data_files"]["test"]
    assert copied.startswith(str(d)) and open(copied).read() == outside.read_text()  # reads the copy
    outside.write_text(json.dumps({"q": "Which module lists files?", "a": "os"}) + "\n")
    _, h2 = suites.prepare(p, tmp_path)
    assert h2["a"] != h["a"] and h2["b"] == h["b"]


def test_qlora_ops_check_refuses_a_bad_lm_eval_suite_with_exit_2(tmp_path, capsys):
    """`qlora-ops check` validated the data and params but never the suites: a malformed task YAML passed it."""
    import argparse

    from qlora_ops.flows.cli.data import data_command

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "l.jsonl").write_text(_rows(60).replace('"answer ', '"a').replace('"output": "a1', '"output": "a0'))
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "bad.yaml").write_text("task: t\n  bad: [indent\n")
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "p.yaml").write_text(
        "data: {raw: data/l.jsonl, labels: null}\neval:\n  suites:\n    - {name: lm, lm_eval: suite/bad.yaml, role: report}\n")
    rc = data_command(argparse.Namespace(cmd="check", params="params/p.yaml", workspace=str(tmp_path)))
    err = capsys.readouterr().err
    assert rc == 2 and "eval.suites[0] (lm).lm_eval" in err and "not a valid lm-eval task YAML" in err, err
