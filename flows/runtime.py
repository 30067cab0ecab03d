"""Orchestration policy, one concern per module; this module re-exports their public names so that
`from flows import runtime; runtime.stage(...)` keeps working. New code imports from the module itself:

    flows.faults          fault classes (exit codes) and which of them retry: is_transient, backoff
    flows.stages          stage(): a task with its params timeout and transient-only retries
    flows.stage_timer     StageTimer: wall seconds and peak memory per stage
    flows.registry_slot   one registry writer at a time (the registered model's global concurrency slot)
    flows.services        check_services(): the tracking server and Prefect API answer, in seconds
    flows.tracebacks      quiet_expected_tracebacks(): one line for an expected failure
    flows.prefect_server  the laptop's temporary Prefect API server, our child
    flows.workspace_lock  one `qlora-ops run` per workspace
"""
from __future__ import annotations

from qlora_ops.flows.faults import (Rejected, ServiceUnavailable, StageTimedOut, backoff, deterministic_errors,
                          is_transient)
from qlora_ops.flows.prefect_server import temporary_prefect_server, wait_prefect_server
from qlora_ops.flows.registry_slot import ensure_registry_limit, registry_limit_name, registry_slot
from qlora_ops.flows.services import check_services
from qlora_ops.flows.stage_timer import StageTimer
from qlora_ops.flows.stages import stage
from qlora_ops.flows.tracebacks import quiet_expected_tracebacks
from qlora_ops.flows.workspace_lock import WorkspaceBusy, workspace_run_lock
from qlora_ops.tasks.core.secrets import redact_url as redact

__all__ = ["Rejected", "ServiceUnavailable", "StageTimedOut", "StageTimer", "WorkspaceBusy", "backoff",
           "check_services", "deterministic_errors", "ensure_registry_limit", "is_transient",
           "quiet_expected_tracebacks", "redact", "registry_limit_name", "registry_slot", "stage",
           "temporary_prefect_server", "wait_prefect_server", "workspace_run_lock"]
