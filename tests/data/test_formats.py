"""Data in the formats people have (tasks/data/prepare.py, tasks/intake/init_params.py, tasks/intake/check.py): row shapes
(alpaca, chat `messages`, prompt/completion), data.columns, data.labels, CSV / Parquet / .arrow /
save_to_disk directories, and every bad row named file:line or file:row in one error.

Fast: no model, no network; real files written with pandas, pyarrow and datasets.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from qlora_ops.tasks.core.config import DataParams, Params, ParamsError, load_params
from qlora_ops.tasks.data.prepare import DataError, detect_format, load_raw, prepare
from qlora_ops.tasks.data.readers import columns_of
from qlora_ops.tasks.core.util import read_jsonl

LABELS = ["json", "math", "os", "re"]


def error_of(fn, *args, **kw) -> str:
    with pytest.raises(DataError) as e:
        fn(*args, **kw)
    return str(e.value)


def chat(i: int, system: str | None = None, history: int = 0) -> dict:
    msgs = [{"role": "system", "content": system}] if system is not None else []
    for h in range(history):
        msgs += [{"role": "user", "content": f"earlier {h}"}, {"role": "assistant", "content": f"reply {h}"}]
    msgs += [{"role": "user", "content": f"Item {i} is about {LABELS[i % 4]}."}, {"role": "assistant", "content": LABELS[i % 4]}]
    return {"messages": msgs}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- detection and column mapping
@pytest.mark.parametrize("cols, mapping, fmt", [
    (["instruction", "input", "output"], {}, "alpaca"),
    (["messages", "id"], {}, "chat"),
    (["prompt", "completion"], {}, "prompt_completion"),
    (["conv"], {"messages": "conv"}, "chat"),
    (["q", "a"], {"prompt": "q", "completion": "a"}, "prompt_completion"),
    (["text", "label"], {}, "alpaca"),  # nothing fits: alpaca, so the error names instruction/output
    (["prompt", "output"], {}, "alpaca"),  # mixed: the documented default shape reports what is missing
])
def test_detect_format_from_columns_after_mapping(cols, mapping, fmt):
    assert detect_format(cols, mapping) == fmt


def test_csv_with_mapped_columns_loads_and_names_bad_rows_by_your_column(tmp_path):
    f = tmp_path / "qa.csv"
    pd.DataFrame({"question": ["Q1?", "Q2?", "", "Q4?"], "ctx": ["c1", "", "c3", "c4"],
                  "answer": ["a", "b", "a", ""]}).to_csv(f, index=False)
    d = DataParams(columns={"instruction": "question", "input": "ctx", "output": "answer"})
    msg = error_of(load_raw, f, d)
    assert f'{f}:3: "question" (data.columns.instruction) must be a non-empty string' in msg
    assert f'{f}:4: "answer" (data.columns.output) must be a non-empty string' in msg
    assert "2 bad row(s)" in msg
    pd.DataFrame({"question": ["Q1?", "Q2?"], "ctx": ["c1", ""], "answer": ["a", "b"]}).to_csv(f, index=False)
    rows = load_raw(f, d)
    assert [(r["instruction"], r["input"], r["output"], r["line"]) for r in rows] == [("Q1?", "c1", "a", 1), ("Q2?", "", "b", 2)]
    # without the mapping: the file is named with its columns and how to map them
    msg = error_of(load_raw, f)
    assert f"{f}: no column 'instruction' or 'output'" in msg and "data.columns" in msg


def test_unknown_or_clashing_column_keys_fail_naming_the_key(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("data:\n  format: chat\n  columns: {instruction: question}\n")
    with pytest.raises(ParamsError, match=r"data.columns.instruction: not a field of format chat"):
        load_params(f)
    f.write_text("data:\n  columns: {instruction: q, output: q}\n")
    with pytest.raises(ParamsError, match="two fields read the same column"):
        load_params(f)
    f.write_text("data:\n  labels: [a, a]\n")
    with pytest.raises(ParamsError, match="data.labels"):
        load_params(f)
    f.write_text("data:\n  format: csv\n")
    with pytest.raises(ParamsError, match="data.format"):
        load_params(f)


# ---------------------------------------------------------------- chat
def test_chat_jsonl_system_turn_overrides_and_history_is_kept(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [chat(0), chat(1, system="Be terse."), chat(2, history=1)])
    rows = load_raw(f)
    assert [r["system"] for r in rows] == [None, "Be terse.", None]
    assert rows[0]["instruction"] == "" and rows[0]["input"] == "Item 0 is about json." and rows[0]["output"] == "json"
    assert rows[2]["instruction"] == "Earlier in this conversation:\n\nUser: earlier 0\n\nAssistant: reply 0"
    rows = [chat(i, system="Be terse." if i % 2 else None) for i in range(60)]
    write_jsonl(f, rows)
    p = Params(data=DataParams(raw=str(f), prepared=str(tmp_path / "out"), system_prompt="Default."))
    stats = prepare(p, tmp_path)
    assert stats["formats"] == {"c.jsonl": "chat"} and stats["rows_after_dedupe"] == 60
    out = [r for s in ("train", "val", "test") for r in read_jsonl(tmp_path / "out" / f"{s}.jsonl")]
    by_prompt = {r["prompt"]: r for r in out}
    assert by_prompt["Item 1 is about math."]["system"] == "Be terse."
    assert by_prompt["Item 2 is about os."]["system"] == "Default."
    assert set(out[0]) == {"id", "system", "prompt", "completion"}  # the prepared format is unchanged


def test_chat_bad_rows_each_named_with_line_and_turn(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [
        chat(0),
        {"messages": [{"role": "user", "content": "q"}]},  # 2: no answer
        {"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                      {"role": "assistant", "content": "a"}]},  # 3: system not first
        {"messages": [{"role": "tool", "content": "q"}, {"role": "assistant", "content": "a"}]},  # 4: bad role
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": " "}]},  # 5: content
        {"messages": "hello"},  # 6
        {"msgs": []},  # 7: missing
        '{"messages": [',  # 8: not JSON (datasets' JSON loader would name no line)
        chat(9),
    ])
    msg = error_of(load_raw, f)
    assert f"{f}:2: the last turn must be the assistant's answer (got a user turn)" in msg
    assert f"{f}:3: messages[1]: a system turn must be the first turn" in msg
    assert f"{f}:4: messages[0]: role 'tool' (allowed: system, user, assistant)" in msg
    assert f'{f}:5: messages[0]: "content" must be a string' in msg and "messages[1]: empty assistant turn" in msg
    assert f'{f}:6: "messages" must be a non-empty list' in msg
    assert f'{f}:7: missing "messages"' in msg
    assert f"{f}:8: not valid JSON" in msg
    assert "7 bad line(s)" in msg and f"{f}:1:" not in msg and f"{f}:9:" not in msg
    assert '"role": "system"|"user"|"assistant"' in msg  # says what a good row looks like


def test_chat_in_parquet_and_csv_and_openai_content_parts(tmp_path):
    rows = [chat(i, system="S") for i in range(3)]
    pd.DataFrame(rows).to_parquet(tmp_path / "c.parquet")  # a list of structs per row
    got = load_raw(tmp_path / "c.parquet")
    assert [r["input"] for r in got] == ["Item 0 is about json.", "Item 1 is about math.", "Item 2 is about os."]
    assert got[0]["system"] == "S" and got[0]["line"] == 1
    rows[1]["messages"][1]["content"] = [{"type": "text", "text": "part one"}, {"type": "text", "text": "two"}]
    assert load_raw(write_jsonl(tmp_path / "parts.jsonl", rows))[1]["input"] == "part one\ntwo"
    pd.DataFrame({"messages": [json.dumps(r["messages"]) for r in rows[:1]] + ["[not json"]}).to_csv(
        tmp_path / "c.csv", index=False)
    msg = error_of(load_raw, tmp_path / "c.csv")
    assert f'{tmp_path / "c.csv"}:2: "messages" is not a JSON list of turns' in msg and "1 bad row(s)" in msg


# ---------------------------------------------------------------- prompt/completion, Arrow, save_to_disk
def test_prompt_completion_from_save_to_disk_and_arrow(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"prompt": ["p1", "p2", None], "completion": ["c1", "", "c3"]})
    ds.save_to_disk(str(tmp_path / "saved"))
    msg = error_of(load_raw, tmp_path / "saved")
    assert f'{tmp_path / "saved"}:2: "completion" must be a non-empty string' in msg
    assert f'{tmp_path / "saved"}:3: "prompt" must be a non-empty string (got None)' in msg
    datasets.DatasetDict({"train": ds.select([0]), "test": ds.select([1])}).save_to_disk(str(tmp_path / "dd"))
    msg = error_of(load_raw, tmp_path / "dd")
    assert f'{tmp_path / "dd" / "test"}:1: "completion"' in msg and "1 of 2 files" in msg
    good = datasets.Dataset.from_dict({"prompt": ["p1", "p2"], "completion": ["c1", "c2"]})
    good.save_to_disk(str(tmp_path / "good"))
    rows = load_raw(tmp_path / "good")
    assert [(r["instruction"], r["input"], r["output"], r["line"]) for r in rows] == [("", "p1", "c1", 1), ("", "p2", "c2", 2)]
    # a bare .arrow shard (datasets' stream format) reads the same
    shard = next((tmp_path / "good").glob("*.arrow"))
    assert [r["output"] for r in load_raw(shard)] == ["c1", "c2"]
    (tmp_path / "junk.arrow").write_bytes(b"not arrow")
    assert f'{tmp_path / "junk.arrow"}: not a readable datasets .arrow file' in error_of(load_raw, tmp_path / "junk.arrow")


def test_directory_with_saved_dataset_and_files_lists_one_unit_each(tmp_path):
    import datasets

    d = tmp_path / "raw"
    d.mkdir()
    datasets.Dataset.from_dict({"instruction": ["I"], "output": ["a"]}).save_to_disk(str(d / "hf"))
    write_jsonl(d / "a.jsonl", [{"instruction": "J", "output": "b"}])
    assert [(Path(u).name, cols) for u, cols in columns_of(d)] == [("a.jsonl", ["instruction", "output"]),
                                                                   ("hf", ["instruction", "output"])]
    assert [(r["instruction"], Path(r["file"]).name) for r in load_raw(d)] == [("J", "a.jsonl"), ("I", "hf")]


def test_snapshot_of_a_save_to_disk_source_mirrors_it_whole(tmp_path):
    import datasets

    from qlora_ops.tasks.data.sources import snapshot

    datasets.Dataset.from_dict({"prompt": ["p"], "completion": ["c"]}).save_to_disk(str(tmp_path / "src"))
    res = snapshot(str(tmp_path / "src"), tmp_path / "raw")
    assert {"state.json", "dataset_info.json"} <= set(res["files"]) and any(f.endswith(".arrow") for f in res["files"])
    assert [r["output"] for r in load_raw(tmp_path / "raw")] == ["c"]


# ---------------------------------------------------------------- labels, many bad rows
def test_answer_outside_the_label_set_is_a_named_bad_row(tmp_path):
    f = write_jsonl(tmp_path / "l.jsonl", [{"instruction": "Q", "input": str(i), "output": o}
                                           for i, o in enumerate(["json", "os", "jsn", " re "])])
    msg = error_of(load_raw, f, DataParams(labels=LABELS))
    assert f"{f}:3: answer 'jsn' is not one of data.labels (json, math, os, re)" in msg and "1 bad line(s)" in msg


def test_thousands_of_bad_rows_list_the_first_twenty_and_count_all(tmp_path):
    f = tmp_path / "big.csv"
    pd.DataFrame({"prompt": [f"p{i}" for i in range(5000)], "completion": [""] * 5000}).to_csv(f, index=False)
    msg = error_of(load_raw, f)
    assert "5000 bad row(s)" in msg and f"{f}:20:" in msg and f"{f}:21:" not in msg and "and 4980 more" in msg


# ---------------------------------------------------------------- init and check
def test_init_detects_aliases_labels_and_sizes_the_test_set(tmp_path):
    from qlora_ops.tasks.intake.init_params import detect, label_set, split_for
    from qlora_ops.tasks.gates.policy import PromotionPolicy

    assert detect(["Question", "Answer"]) == ("alpaca", {"instruction": "Question", "output": "Answer"}, True)
    assert detect(["text", "label"]) == ("prompt_completion", {"prompt": "text", "completion": "label"}, True)
    assert detect(["instruction", "output", "context"]) == ("alpaca", {}, False)
    with pytest.raises(DataError, match="data.columns"):
        detect(["a", "b"])
    assert label_set({"labels": {"x": 5, "y": 5}, "rows_after_dedupe": 10}) == ["x", "y"]
    assert label_set({"labels": {"a long free text answer here": 5, "y": 5}, "rows_after_dedupe": 10}) is None
    assert label_set({"labels": None, "rows_after_dedupe": 5000}) is None
    policy = PromotionPolicy()
    val, test, note = split_for(100_000, policy)
    assert test < 0.05 and 1960 <= round(100_000 * test) <= 2100 and "enough to tell a 2-point difference" in note
    val, test, note = split_for(200, policy)
    assert test == 0.4 and "~80 of 200 rows" in note and "cannot tell a 2-point regression" in note


def test_init_writes_a_loadable_params_file_and_refuses_to_overwrite(tmp_path):
    from qlora_ops.tasks.intake.init_params import write_params

    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    pd.DataFrame({"text": [f"Item {i} about {LABELS[i % 4]}" for i in range(80)],
                  "label": [LABELS[i % 4] for i in range(80)]}).to_parquet(ws / "data" / "items.parquet")
    res = write_params(ws / "data" / "items.parquet", ws)
    assert res["path"] == "params/items.yaml"
    text = (ws / "params" / "items.yaml").read_text()
    assert text.splitlines()[1] == "#   qlora-ops run --params params/items.yaml"
    p = load_params(ws / "params" / "items.yaml")
    assert p.data.raw == "data/items.parquet" and p.data.source is None and p.data.format == "prompt_completion"
    assert p.data.columns == {"prompt": "text", "completion": "label"} and p.data.labels == LABELS
    assert p.registry.model_name == "qlora-ops-items" and p.data.prepared == "data/prepared/items"
    with pytest.raises(ParamsError, match="already exists"):
        write_params(ws / "data" / "items.parquet", ws)
    with pytest.raises(ParamsError, match="inside the workspace"):
        write_params(ws / "data" / "items.parquet", ws, out=str(tmp_path / "elsewhere.yaml"))
    # data outside the workspace: data.source points at it, data.raw is the snapshot directory
    pd.read_parquet(ws / "data" / "items.parquet").to_parquet(tmp_path / "outside.parquet")
    res = write_params(tmp_path / "outside.parquet", ws)
    p = load_params(ws / res["path"])
    assert p.data.source == str(tmp_path / "outside.parquet") and p.data.raw == "data/raw/outside"


def test_check_reports_the_run_and_names_bad_rows(tmp_path):
    from qlora_ops.tasks.intake.check import check, format_check

    ws = tmp_path / "ws"
    (ws / "params").mkdir(parents=True)
    f = write_jsonl(ws / "c.jsonl", [chat(i) for i in range(50)])
    (ws / "params" / "c.yaml").write_text(yaml.safe_dump({"data": {"raw": "c.jsonl", "labels": LABELS},
                                                          "training": {"epochs": 2, "batch_size": 4},
                                                          # 50 rows: too few for a 0/1 merge gate at 0.06 (issue 26)
                                                          "gates": {"max_merge_disagreement": 0.5}}))
    c = check(Path("params/c.yaml"), ws)
    s = c["stats"]
    assert s["formats"] == {"c.jsonl": "chat"} and s["train"] + s["val"] + s["test"] == 50
    assert c["steps"] == -(-2 * s["train"] // 4) and c["stage"] == "prepare-c"
    out = format_check(c)
    assert "chat (1 file)" in out and "labels    4 (data.labels)" in out and f"{c['steps']} steps" in out
    assert not (ws / "data").exists() and not (ws / ".qlora-ops").exists()  # nothing written in the workspace
    write_jsonl(f, [chat(i) for i in range(49)] + ['{"messages": 1}'])
    assert f"{f}:50: " in error_of(check, Path("params/c.yaml"), ws)
