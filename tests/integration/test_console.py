"""What `qlora-ops run` prints when its output is a file (CI, a Prefect worker's log): the real CLI in a
subprocess, on a tiny random Llama in a temp git + DVC workspace, with the default local MLflow store and
Prefect's temporary server (as a plain `qlora-ops run` on a laptop), stdout and stderr into one file.

By default: one line per stage start and end with its time, progress as a line every ~10 % (never a
carriage return), the summary; no third-party warning, progress bar or Prefect run-state line.
`--verbose` brings Prefect's lines back; a failure is one paragraph with the documented exit code, and
the traceback only with `--debug`.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_workspace

pytestmark = pytest.mark.slow

STEPS, ROWS = 4, 24
# Third-party noise seen on a default run before the console was quiet.
NOISE = ["FutureWarning", "UserWarning", "DeprecationWarning", "warnings.warn", "color_warning(",
         "kernels-community", "Add type hints", "Finished in state", "Beginning flow run", "Starting temporary server",
         "Successfully registered model", "Created version", "Downloading artifacts", "Creating initial MLflow database",
         "\x1b["]


def write_params(ws: Path, name: str, model_dir: Path, **data) -> str:
    p = {"model": {"source": str(model_dir), "max_seq_len": 96},
         "data": {"prepared": f"data/prepared/{name}", **data},
         "training": {"max_steps": STEPS, "batch_size": 8, "eval_every": 2, "save_every": 2, "threads": 1,
                      "warmup_steps": 1},
         # batch 2: 12 updates per evaluation, so "a line every ~10 %" is visibly fewer lines than updates
         "eval": {"batch_size": 2, "max_new_tokens": 4, "max_examples": ROWS},
         "gates": {"min_gain_over_base": -1.0, "min_retention_vs_lora": 0.0, "max_merge_disagreement": 1.0},
         "registry": {"experiment": f"exp-{name}", "model_name": f"console-{name}"}}
    rel = f"params/{name}.yaml"
    (ws / rel).write_text(yaml.safe_dump(p))
    return rel


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_dir):
    ws = make_workspace(tmp_path_factory.mktemp("console") / "repo")
    write_params(ws, "tiny", tiny_model_dir)
    (ws / "data" / "raw").mkdir(parents=True, exist_ok=True)
    (ws / "data/raw/broken.jsonl").write_text('{"instruction": "a", "input": "b", "output": "c"}\nnot json\n')
    write_params(ws, "broken", tiny_model_dir, raw="data/raw/broken.jsonl")
    bad = yaml.safe_load((ws / "params/tiny.yaml").read_text())
    bad["trainig"] = {"max_steps": 1}  # a misspelled key
    (ws / "params/badkey.yaml").write_text(yaml.safe_dump(bad))
    return ws


def run_cli(ws: Path, *args: str) -> tuple[int, str]:
    """`python -m qlora_ops.flows.cli ARGS` with stdout + stderr redirected to a file; (exit code, the file's text)."""
    # Nothing of the test process's own console/Prefect/MLflow settings: what a user's shell would have.
    drop = ("PREFECT_", "QLORA_OPS_", "MLFLOW_", "TRANSFORMERS_", "PYTHONWARNINGS", "HF_HUB_DISABLE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(PYTHONPATH=str(ws), PREFECT_HOME=str(ws.parent / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    out = ws.parent / "console.txt"
    with open(out, "w") as fh:
        r = subprocess.run([sys.executable, "-m", "qlora_ops.flows.cli", *args, "--workspace", str(ws)], cwd=ws, env=env,
                           stdout=fh, stderr=subprocess.STDOUT, timeout=900)
    return r.returncode, out.read_text(errors="replace")


@pytest.fixture(scope="module")
def quiet_run(ws):
    return run_cli(ws, "run", "--params", "params/tiny.yaml")


def test_default_run_prints_stages_progress_and_summary_only(quiet_run):
    rc, text = quiet_run
    assert rc == 0, text[-4000:]
    assert "\r" not in text  # no carriage-return progress bars in a file
    lines = text.splitlines()
    noisy = [ln for ln in lines if any(n in ln for n in NOISE) or re.search(r"(?i)warn", ln)]
    assert not noisy, "\n".join(noisy)

    # one line at the start and one at the end of each stage, with the clock and the stage's seconds
    for stage in ("prepare", "model_stage", "train_qlora", "train_lora", "eval_base", "eval_lora", "eval_qlora",
                  "merge", "eval_merged", "register"):
        assert sum(bool(re.fullmatch(rf"\d\d:\d\d:\d\d {stage} \.\.\.", ln)) for ln in lines) == 1, stage
        assert sum(bool(re.fullmatch(rf"\d\d:\d\d:\d\d {stage} done in \d+\.\d s", ln)) for ln in lines) == 1, stage

    # evaluation progress: rows/s, a line every ~10 % (fewer lines than the 12 updates), the last one at 100 %
    for name in ("base", "lora", "qlora", "merged"):
        mine = [ln for ln in lines if ln.startswith(f"eval {name}: ")]
        assert mine and re.match(rf"eval {name}: 100% {ROWS}/{ROWS} .*rows/s", mine[-1]), mine
        assert len(mine) <= 11 and len(mine) < ROWS // 2, mine
        assert all(re.match(rf"eval {name}: \d+% \d+/{ROWS} ", ln) for ln in mine), mine
    # training progress for both adapters, ending at the last step
    for kind in ("qlora", "lora"):
        done = [ln for ln in lines if not ln.startswith("eval") and re.search(rf"\b{kind}\b.*: 100% {STEPS}/{STEPS}\b", ln)]
        assert done, f"no training progress line for {kind}"

    assert "qlora-ops summary" in text and "registry: console-tiny v1 registered" in text
    assert re.search(r"^total wall time: \d+\.\d s$", text, re.M)


def test_verbose_brings_third_party_logging_back(ws, quiet_run):
    rc, text = run_cli(ws, "run", "--params", "params/tiny.yaml", "--force", "--verbose")
    assert rc == 0, text[-4000:]
    assert "Finished in state Completed" in text and "Beginning flow run" in text  # Prefect's run loggers
    assert "qlora-ops summary" in text


def test_bad_params_key_is_one_paragraph_and_exit_2(ws):
    rc, text = run_cli(ws, "run", "--params", "params/badkey.yaml")
    assert rc == 2, text
    assert "Traceback" not in text
    assert text.startswith("qlora-ops: error: ") and "trainig" in text
    assert "\n\n" not in text.strip()  # one paragraph

    rc, text = run_cli(ws, "run", "--params", "params/badkey.yaml", "--debug")
    assert rc == 2, text
    assert "Traceback (most recent call last)" in text and "ParamsError" in text
    assert "qlora-ops: error: " in text and "trainig" in text


def test_failure_inside_the_flow_is_one_paragraph_without_prefect_tracebacks(ws):
    rc, text = run_cli(ws, "run", "--params", "params/broken.yaml")
    assert rc == 2, text
    assert "Traceback" not in text and "Finished in state" not in text and "Encountered exception" not in text
    assert "broken.jsonl:2" in text  # the message names file:line
    # what is printed: the stage lines, then the CLI's paragraph
    assert re.search(r"^\d\d:\d\d:\d\d prepare failed after \d+\.\d s$", text, re.M), text
    tail = text[text.index("qlora-ops: error: "):]
    assert "\n\n" not in tail.strip(), tail

    rc, text = run_cli(ws, "run", "--params", "params/broken.yaml", "--debug")
    assert rc == 2, text
    assert "Traceback (most recent call last)" in text and "broken.jsonl:2" in text
