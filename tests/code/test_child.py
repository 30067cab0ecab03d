"""A stage run in a child process that returns (tasks/core/child.py): what crosses is params, paths and JSON,
errors keep their class, the child's traceback shows only with --debug; $QLORA_STAGES_IN_PROCESS=1 (the test
suite's setting) runs the same call in this process."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from qlora_ops.tasks.core.child import call_in_child
from qlora_ops.tasks.core.config import Params

PROBE = '''
import os
from pathlib import Path


def where(params, p, n=1):
    assert isinstance(p, Path)
    return {"pid": os.getpid(), "path": p / "x", "seed": params.seed, "n": n}


def boom(params):
    raise ZeroDivisionError("planted in the child")


def noisy(params):
    import logging
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward from kernels-community")
    logging.getLogger("qlora_ops.stage").info("our own line")
    return 1
'''


@pytest.fixture
def probe(tmp_path, monkeypatch):
    (tmp_path / "child_probe.py").write_text(PROBE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    return tmp_path


def test_a_stage_runs_in_a_child_that_returns_paths_and_json(probe, monkeypatch):
    monkeypatch.setenv("QLORA_STAGES_IN_PROCESS", "0")
    out = call_in_child("child_probe:where", Params(seed=7), probe, n=3)
    assert out["pid"] != os.getpid() and out["seed"] == 7 and out["n"] == 3
    assert out["path"] == probe / "x" and isinstance(out["path"], Path)


def test_a_childs_error_keeps_its_class_and_its_traceback_only_with_debug(probe, monkeypatch, capfd):
    monkeypatch.setenv("QLORA_STAGES_IN_PROCESS", "0")
    monkeypatch.delenv("QLORA_OPS_DEBUG", raising=False)
    with pytest.raises(ZeroDivisionError, match="planted in the child"):
        call_in_child("child_probe:boom", Params())
    assert "Traceback" not in capfd.readouterr().err  # the CLI says it in one paragraph
    monkeypatch.setenv("QLORA_OPS_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        call_in_child("child_probe:boom", Params())
    assert "Traceback" in capfd.readouterr().err


def test_in_process_when_the_suite_says_so_unless_forced(probe, monkeypatch):
    monkeypatch.setenv("QLORA_STAGES_IN_PROCESS", "1")
    assert call_in_child("child_probe:where", Params(), probe)["pid"] == os.getpid()
    assert call_in_child("child_probe:where", Params(), probe, force_child=True)["pid"] != os.getpid()


def test_a_child_is_as_quiet_as_its_caller(probe, monkeypatch, capfd):
    """A stage's child configures the console from the caller's choice (the environment), as the training
    child does: a default run shows no third-party log line from a stage (bitsandbytes' at its import)."""
    monkeypatch.setenv("QLORA_STAGES_IN_PROCESS", "0")
    for k in ("QLORA_OPS_VERBOSE", "QLORA_OPS_DEBUG"):
        monkeypatch.delenv(k, raising=False)
    assert call_in_child("child_probe:noisy", Params()) == 1
    err = capfd.readouterr().err
    assert "kernels-community" not in err and "our own line" in err, err
    monkeypatch.setenv("QLORA_OPS_VERBOSE", "1")
    assert call_in_child("child_probe:noisy", Params()) == 1
    assert "kernels-community" in capfd.readouterr().err

