"""tasks.core.console.configure in a fresh interpreter: third-party warnings and log lines off by default (also in
child processes, through the environment), back with verbose; tracebacks on log records only with debug."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT

SNIPPET = r"""
import logging, subprocess, sys, warnings
from qlora_ops.tasks.core import console
console.configure(verbose={verbose}, debug={debug})
assert "mlflow" not in sys.modules  # quieted when something imports it, not imported to be quieted
warnings.warn("third-party FutureWarning", FutureWarning)
with warnings.catch_warnings():  # as MLflow does around its "add type hints" UserWarning
    warnings.simplefilter("once", category=UserWarning)
    warnings.warn("re-enabled UserWarning", UserWarning)
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward from kernels-community")
logging.getLogger("qlora_ops.train").info("our own line")
try:
    raise ValueError("boom")
except ValueError:
    logging.getLogger("qlora_ops").exception("our failure")
from mlflow.utils.logging_utils import eprint
eprint("Successfully registered model 'x'.")
subprocess.run([sys.executable, "-c", "import warnings; warnings.warn('child FutureWarning', FutureWarning)"])
"""


def run(verbose: bool = False, debug: bool = False) -> str:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("QLORA_OPS_", "PYTHONWARNINGS", "TRANSFORMERS_", "MLFLOW_", "TQDM_"))}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-c", SNIPPET.format(verbose=verbose, debug=debug)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout + r.stderr


def test_quiet_by_default_also_in_child_processes():
    out = run()
    assert "our own line" in out and "our failure" in out
    for noise in ("FutureWarning", "UserWarning", "kernels-community", "Successfully registered", "Traceback"):
        assert noise not in out, out


def test_verbose_brings_everything_back_and_debug_the_tracebacks():
    out = run(verbose=True)
    for line in ("third-party FutureWarning", "re-enabled UserWarning", "kernels-community",
                 "Successfully registered", "child FutureWarning", "our own line"):
        assert line in out, out
    assert "Traceback" not in out  # verbose alone: a failure's log line, not its stack
    assert "Traceback (most recent call last)" in run(debug=True)
