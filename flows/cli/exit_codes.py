"""Exit codes: the documented table (EXIT), which kind of failure an exception is (classify), and the
one-paragraph message a command ends with (fail).

0 registered, or skipped because nothing is new; 1 refused by a gate (nothing registered); 2 bad params
or data; 3 training diverged; 4 a service did not answer, or another run kept the workspace; 5 internal
error, a stage past its orchestration.timeouts entry, or a full disk; 6 the run went on with the last good data
but set a bad drop aside (quarantined: `qlora-ops status` lists it with its reason).
"""
from __future__ import annotations

import sys
import traceback

from qlora_ops.flows.runtime import ServiceUnavailable, StageTimedOut, is_transient
from qlora_ops.tasks.core import console
from qlora_ops.tasks.core.config import ParamsError
from qlora_ops.tasks.core.util import DiskFull
from qlora_ops.tasks.data.prepare import DataError
from qlora_ops.tasks.model.base import BaseModelError

EXIT = {"registered": 0, "skipped": 0, "rejected": 1, "bad_input": 2, "diverged": 3, "service": 4, "internal": 5,
        "timeout": 5, "disk_full": 5, "quarantined": 6}


def classify(exc: BaseException) -> str:
    # These three import torch (and Prefect): seconds no command pays before it fails.
    from qlora_ops.flows.remote_stage import ModelStageFailed
    from qlora_ops.tasks.data.versioning import DvcError
    from qlora_ops.tasks.model.modeling import DivergenceError

    if isinstance(exc, (ParamsError, DataError, DvcError, BaseModelError)) or \
            (isinstance(exc, ModelStageFailed) and "orchestration.gpu_required" in str(exc)):  # no GPU on the GPU pool
        return "bad_input"
    if isinstance(exc, StageTimedOut):
        return "timeout"
    if isinstance(exc, DivergenceError) or (isinstance(exc, ModelStageFailed) and "Diverg" in str(exc)):
        return "diverged"
    # A network fault still there after the stage's retries (DVC remote, data.source, tracking server
    # mid-run) is a service that did not answer, not an internal error.
    if isinstance(exc, DiskFull):  # exit 5 like any fault of the machine, but said plainly, with the path
        return "disk_full"
    if isinstance(exc, ServiceUnavailable) or is_transient(exc):
        return "service"
    return "internal"


def fail(kind: str, exc: BaseException, label: str | None = None) -> int:
    """Say what failed in one paragraph (the full traceback first with --debug); the documented exit code."""
    if console.is_debug():
        traceback.print_exception(exc)
    label = label or {"bad_input": "error", "diverged": "training diverged", "service": "service unavailable",
                      "internal": "internal error", "rejected": "refused", "timeout": "timed out",
                      "disk_full": "disk full"}[kind]
    hint = "\n(rerun with --debug for the full traceback)" if kind == "internal" and not console.is_debug() else ""
    print(f"qlora-ops: {label}: {exc}{hint}", file=sys.stderr)
    return EXIT[kind]
