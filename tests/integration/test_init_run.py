"""`qlora-ops init DATAFILE` then `qlora-ops run` on the data people have: a CSV with its own column
names, a Parquet file of {text, label}, a chat-`messages` JSONL. Each with a planted bad row: init and
run exit 2 naming file and row/line (nothing trained, nothing registered); fixed, the run completes.

Real parts: the CLI in a subprocess, `dvc repro` of the params file's own stage in a temp git + DVC
repo, a real Prefect server, MLflow's SQLite store, the tiny random Llama (a few steps, a small eval).
The tiny model cannot learn, so the params get lax gates: this proves the wiring, not the gain.
"""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_workspace, start_prefect_server

pytestmark = pytest.mark.slow

LABELS = ["json", "math", "os", "re"]
N = 60  # rows per data set: every split gets rows, each run stays small


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("init-ws") / "repo")


@pytest.fixture(scope="module")
def prefect(tmp_path_factory):
    with start_prefect_server(tmp_path_factory.mktemp("prefect-init") / "home") as server:
        yield server


def qlora_ops(ws: Path, server, *args: str) -> subprocess.CompletedProcess:
    env = server.client_env(PYTHONPATH=str(ws))
    env.pop("MLFLOW_TRACKING_URI", None)  # the workspace's own SQLite store
    return subprocess.run([sys.executable, "-m", "qlora_ops.flows.cli", *args, "--workspace", str(ws)], cwd=ws, env=env,
                          capture_output=True, text=True, timeout=900)


def question(i: int) -> str:
    return f"Item {i}: this one is about {LABELS[i % 4]}. Which label?"


# name -> (file, writer(path, bad), where the bad row is, what the error says, format, columns)
def write_csv(path: Path, bad: str | None) -> None:
    import pandas as pd

    rows = [{"question": question(i), "answer": LABELS[i % 4]} for i in range(N)]
    if bad == "init":
        rows[4]["answer"] = ""  # data row 5
    elif bad == "run":
        rows[4]["answer"] = "jsn"  # a typo: not one of the label set init wrote
    pd.DataFrame(rows).to_csv(path, index=False)


def write_parquet(path: Path, bad: str | None) -> None:
    import pandas as pd

    rows = [{"text": question(i), "label": LABELS[i % 4]} for i in range(N)]
    if bad:
        rows[6]["text"] = None  # row 7: a null prompt
    pd.DataFrame(rows).to_parquet(path)


def write_chat(path: Path, bad: str | None) -> None:
    lines = []
    for i in range(N):
        msgs = [{"role": "user", "content": question(i)}, {"role": "assistant", "content": LABELS[i % 4]}]
        if i % 2:  # half the rows bring their own system turn: it overrides data.system_prompt for them
            msgs.insert(0, {"role": "system", "content": "You label items."})
        lines.append(json.dumps({"messages": msgs}))
    if bad == "init":
        lines[3] = json.dumps({"messages": [{"role": "user", "content": "no answer"}]})  # line 4
    elif bad == "run":
        lines[3] = '{"messages": [{"role": "user", "content": "cut off'  # line 4: not JSON at all
    path.write_text("\n".join(lines) + "\n")


CASES = {
    "csv": ("tickets.csv", write_csv, {"init": (":5", '"answer" (data.columns.output) must be a non-empty string'),
                                       "run": (":5", "'jsn' is not one of data.labels")},
            "alpaca", {"instruction": "question", "output": "answer"}),
    "parquet": ("items.parquet", write_parquet, {"init": (":7", '"text" (data.columns.prompt) must be a non-empty string'),
                                                 "run": (":7", '"text" (data.columns.prompt) must be a non-empty string')},
                "prompt_completion", {"prompt": "text", "completion": "label"}),
    "chat": ("chats.jsonl", write_chat, {"init": (":4", "the last turn must be the assistant's answer"),
                                         "run": (":4", "not valid JSON")},
             "chat", {}),
}

TINY = {"training": {"max_steps": 2, "batch_size": 8, "eval_every": 2, "save_every": 2, "threads": 1, "warmup_steps": 1},
        "eval": {"batch_size": 32, "max_new_tokens": 4, "max_examples": 16},
        "gates": {"min_gain_over_base": -1.0, "min_retention_vs_lora": 0.0, "max_merge_disagreement": 1.0}}


def registered_versions(ws: Path, model_name: str) -> int:
    db = ws / ".qlora-ops" / "mlflow.db"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as c:
        if not c.execute("select name from sqlite_master where name='model_versions'").fetchone():
            return 0
        return c.execute("select count(*) from model_versions where name=?", (model_name,)).fetchone()[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_init_then_run_names_the_bad_row_then_completes(ws, prefect, tiny_model_dir, case):
    fname, write, bad, fmt, columns = CASES[case]
    data = ws / "data" / "raw" / fname
    data.parent.mkdir(parents=True, exist_ok=True)
    rel_data, stem = f"data/raw/{fname}", Path(fname).stem
    params = ws / "params" / f"{stem}.yaml"

    # init on data with a bad row: exit 2 naming file:row, no params file written
    write(data, "init")
    r = qlora_ops(ws, prefect, "init", rel_data, "--model", str(tiny_model_dir))
    where, what = bad["init"]
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"{rel_data}{where}: " in r.stderr and what in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not params.exists()

    # fixed: init writes a params file for this data, opening with the command that runs it
    write(data, None)
    r = qlora_ops(ws, prefect, "init", rel_data, "--model", str(tiny_model_dir))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    text = params.read_text()
    assert text.startswith("# ") and f"qlora-ops run --params params/{stem}.yaml" in text.splitlines()[1]
    p = yaml.safe_load(text)
    assert p["data"]["raw"] == rel_data and p["data"]["format"] == fmt and p["data"].get("columns", {}) == columns
    assert p["data"]["labels"] == LABELS  # few short repeated answers: a label set
    assert p["data"]["split"]["test"] == 0.4 and "cannot tell a 2-point regression" in text  # small data: capped, said so
    name = p["registry"]["model_name"]

    r = qlora_ops(ws, prefect, "check", "--params", f"params/{stem}.yaml")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"{rel_data}: {fmt}" in r.stdout and "labels    4" in r.stdout and "nothing was trained" in r.stdout

    # the run on init's params (made tiny: a few steps, lax gates), with a bad row planted again
    for section, values in TINY.items():
        p[section] = {**p.get(section, {}), **values}
    p["model"]["max_seq_len"] = 96
    params.write_text(yaml.safe_dump(p))
    write(data, "run")
    where, what = bad["run"]
    r = qlora_ops(ws, prefect, "check", "--params", f"params/{stem}.yaml")
    assert r.returncode == 2 and f"{rel_data}{where}: " in r.stderr and what in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    r = qlora_ops(ws, prefect, "run", "--params", f"params/{stem}.yaml")
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-3000:]
    assert f"{rel_data}{where}: " in r.stderr and what in r.stderr, r.stderr[-3000:]
    assert "[qlora]" not in out and "train_qlora" not in out  # nothing trained
    assert registered_versions(ws, name) == 0

    # fixed: the run completes and registers the model
    write(data, None)
    r = qlora_ops(ws, prefect, "run", "--params", f"params/{stem}.yaml")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert registered_versions(ws, name) == 1
    assert f"prepare-{stem}" in yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]
    rows = [json.loads(l) for s in ("train", "val", "test")
            for l in (ws / "data" / "prepared" / stem / f"{s}.jsonl").read_text().splitlines()]
    assert len(rows) == N and {r["completion"] for r in rows} == set(LABELS)
    if case == "chat":  # a row's own system turn wins; the others get data.system_prompt
        from qlora_ops.tasks.core.config import DataParams

        assert {r["system"] for r in rows} == {"You label items.", p["data"].get("system_prompt", DataParams().system_prompt)}
        assert all(r["prompt"].startswith("Item ") for r in rows)
