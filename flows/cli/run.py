"""`qlora-ops run`: the whole loop (flows.retrain) under the workspace's run lock, on a temporary Prefect
API server when PREFECT_API_URL is unset; the flow's final state becomes the exit code."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from qlora_ops.flows.cli.exit_codes import EXIT, classify, fail
from qlora_ops.flows.cli.preflight import preflight
from qlora_ops.flows.registry_slot import RegistryLockUnavailable, check_writer
from qlora_ops.flows.runtime import (ServiceUnavailable, WorkspaceBusy, temporary_prefect_server, wait_prefect_server,
                                     workspace_run_lock)
from qlora_ops.tasks.core.paths import state_dir
from qlora_ops.tasks.core.util import TIE_ENV
from qlora_ops.tasks.intake import workspace


def run_command(a) -> int:
    os.environ[TIE_ENV] = "1"  # our own entry points started below us (via DVC too) die with us
    # Before any work (no lock file yet): a bad key, a dead tracking server or Prefect API, in seconds.
    if isinstance(pre := preflight(a), int):
        return pre
    ws, params, uri = pre
    for line in workspace.upgrade_notes(ws):  # a newer qlora-ops on this workspace: what changes, before it runs
        print(line)
    try:  # a shared registry's writer needs the team's Prefect API: refused now, not after training
        check_writer(uri, params.registry.model_name, state_dir(ws, params))
    except RegistryLockUnavailable as e:
        return fail("service", e)
    # One run per workspace, taken before the slow start (imports, the Prefect server): a second run
    # says at once which pid it waits for, and refuses after orchestration.timeouts.workspace.
    try:
        with workspace_run_lock(ws, params.orchestration.timeouts.workspace):
            with temporary_prefect_server() as api:  # our child: it dies with us, even on kill -9
                return run_locked(a, api)
    except WorkspaceBusy as e:
        return fail("service", e, label="workspace busy")


def run_locked(a, api: str | None) -> int:
    from qlora_ops.flows.retrain import retrain  # Prefect is imported here, after PREFECT_API_URL points at `api`
    try:
        wait_prefect_server(api)
    except ServiceUnavailable as e:
        return fail("service", e)
    state = retrain(params_path=a.params, workspace=a.workspace, force=a.force, return_state=True)
    workspace.record_run(Path(a.workspace).resolve(), state.name, a.params)  # the version and lock that made it
    if state.name == "Rejected":
        return EXIT["rejected"]
    if state.name == "Quarantined":  # completed on the last good data; a drop was set aside
        print(f"qlora-ops: quarantined: {state.message}", file=sys.stderr)
        return EXIT["quarantined"]
    if state.is_completed():
        return EXIT["registered"]
    exc = state.result(raise_on_failure=False)
    exc = exc if isinstance(exc, BaseException) else RuntimeError(state.message)
    return fail(classify(exc), exc)
