"""A new user copies params/default.yaml to try another seed: the copy keeps data.prepared, which the
default file's DVC stage already writes. `check` and `run` both say so naming both params files and the
key to change (DVC's own "output ... is already specified in stage" names neither), before any DVC
command; with its own data.prepared the copy checks clean."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_ops.tasks.core.config import ParamsError, load_params
from qlora_ops.tasks.data.versioning import ensure_stage
from tests.conftest import make_workspace


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    ws = make_workspace(tmp_path_factory.mktemp("copied") / "repo")
    text = (ws / "params/default.yaml").read_text()
    assert text.count("\nseed: 42\n") == 1
    (ws / "params/seed7.yaml").write_text(text.replace("\nseed: 42\n", "\nseed: 7\n"))
    return ws


def cli(ws: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "QLORA_OPS_", "MLFLOW_"))}
    env.update(PYTHONPATH=str(ws), PREFECT_HOME=str(ws.parent / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return subprocess.run([sys.executable, "-m", "qlora_ops.flows.cli", *args, "--workspace", str(ws)], cwd=ws, env=env,
                          capture_output=True, text=True, timeout=timeout)


def says_what_and_how(text: str) -> None:
    assert "params/seed7.yaml: data.prepared='data/prepared/default' is already the output of DVC stage 'prepare' " \
           "of params/default.yaml" in text, text[-3000:]
    assert "`data.prepared: data/prepared/seed7`" in text
    assert "already specified in stage" not in text


def test_ensure_stage_names_both_files_and_the_key_before_dvc_runs(ws):
    before = (ws / "dvc.yaml").read_text()
    with pytest.raises(ParamsError) as e:
        ensure_stage(ws, ws / "params/seed7.yaml", load_params(ws / "params/seed7.yaml"))
    says_what_and_how(str(e.value))
    assert (ws / "dvc.yaml").read_text() == before


def test_check_says_it_too_and_passes_once_the_copy_has_its_own_dir(ws):
    r = cli(ws, "check", "--params", "params/seed7.yaml")
    assert r.returncode == 2
    says_what_and_how(r.stderr)
    own = ws / "params/seed7-own.yaml"
    own.write_text((ws / "params/seed7.yaml").read_text().replace("prepared: data/prepared/default",
                                                                     "prepared: data/prepared/seed7-own"))
    r = cli(ws, "check", "--params", "params/seed7-own.yaml")
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_run_exits_2_with_the_same_words(ws):
    r = cli(ws, "run", "--params", "params/seed7.yaml", timeout=600)
    assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]
    says_what_and_how(r.stderr)
    assert "Traceback" not in r.stdout + r.stderr
