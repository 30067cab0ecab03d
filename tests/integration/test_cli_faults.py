"""Two faults no user input causes, through the real `qlora-ops run` (tiny random Llama, temp git + DVC
workspace, Prefect's temporary server): a stage that outlives its `orchestration.timeouts.*` entry, and a
bug (an exception nobody expected, planted through a `sitecustomize` module on PYTHONPATH, i.e. in the
real process and not a mock of it). Both end with exit 5, one paragraph naming what happened, no
traceback unless --debug, and nothing registered."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_workspace

pytestmark = pytest.mark.slow

PLANT = '''
import qlora_ops.tasks.evaluate.predict as ev
def _bug(*a, **k):
    raise ZeroDivisionError("planted bug in evaluate")
ev.evaluate_model = _bug
'''


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_dir):
    ws = make_workspace(tmp_path_factory.mktemp("faults") / "repo")
    base = {"model": {"source": str(tiny_model_dir), "max_seq_len": 96},
            "training": {"max_steps": 2, "batch_size": 8, "eval_every": 2, "save_every": 2, "threads": 1,
                         "warmup_steps": 1},
            "eval": {"batch_size": 8, "max_new_tokens": 4, "max_examples": 8},
            "orchestration": {"retries": 0},
            # 8 test rows: bars they can support, so the run reaches the stage the fault is in
            "gates": {"min_gain_over_base": -1.0, "min_retention_vs_lora": 0.0, "max_merge_disagreement": 1.0}}
    # 400 steps cannot finish in 2 s: the train stage's own timeout stops it
    hang = {**base, "data": {"prepared": "data/prepared/hang"}, "registry": {"model_name": "hang"},
            "training": {**base["training"], "max_steps": 400}, "orchestration": {"retries": 0, "timeouts": {"train": 2}}}
    bug = {**base, "data": {"prepared": "data/prepared/bug"}, "registry": {"model_name": "bug"}}
    (ws / "params/hang.yaml").write_text(yaml.safe_dump(hang))
    (ws / "params/bug.yaml").write_text(yaml.safe_dump(bug))
    (ws.parent / "plant").mkdir()
    (ws.parent / "plant/sitecustomize.py").write_text(PLANT)
    return ws


def run_cli(ws: Path, *args: str, plant: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "QLORA_OPS_", "MLFLOW_"))}
    path = [str(ws.parent / "plant")] if plant else []
    env.update(PYTHONPATH=os.pathsep.join([*path, str(ws)]), PREFECT_HOME=str(ws.parent / "prefect-home"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return subprocess.run([sys.executable, "-m", "qlora_ops.flows.cli", "run", *args, "--workspace", str(ws)], cwd=ws, env=env,
                          capture_output=True, text=True, timeout=900)


def registered(ws: Path, name: str) -> list:
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{ws}/.qlora-ops/mlflow.db")
    return MlflowClient().search_model_versions(f"name = '{name}'")


def test_a_stage_past_its_timeout_exits_5_naming_the_params_key(ws):
    r = run_cli(ws, "--params", "params/hang.yaml")
    out = r.stdout + r.stderr
    assert r.returncode == 5, out[-4000:]
    lines = [l for l in r.stderr.splitlines() if l.startswith("qlora-ops: ")]
    assert len(lines) == 1 and "orchestration.timeouts.train" in lines[0], lines
    assert "Traceback" not in out
    assert registered(ws, "hang") == []


def test_a_bug_exits_5_in_one_paragraph_and_keeps_its_traceback_for_debug(ws):
    r = run_cli(ws, "--params", "params/bug.yaml", plant=True)
    out = r.stdout + r.stderr
    assert r.returncode == 5, out[-4000:]
    assert "qlora-ops: internal error: planted bug in evaluate" in r.stderr, r.stderr[-3000:]
    assert "(rerun with --debug for the full traceback)" in r.stderr
    assert "Traceback" not in out
    assert registered(ws, "bug") == []
    d = run_cli(ws, "--params", "params/bug.yaml", "--debug", plant=True)
    assert d.returncode == 5
    assert "Traceback" in d.stdout + d.stderr and "ZeroDivisionError: planted bug in evaluate" in d.stdout + d.stderr
