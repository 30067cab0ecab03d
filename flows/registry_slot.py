"""One registry writer at a time, across machines: the registered model's Prefect global concurrency slot."""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from typing import Iterator

from flows.prefect_server import is_temporary


def registry_limit_name(model_name: str) -> str:
    return "qlora-ops-registry-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", model_name)


def ensure_registry_limit(model_name: str) -> str:
    """Create the model's global concurrency limit (1 slot) if missing; Prefect requires limits to exist."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = registry_limit_name(model_name)
    with get_client(sync_client=True) as c:
        try:
            c.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                c.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass  # another run created it between our read and write
    return name


@contextmanager
def registry_slot(model_name: str, timeout_s: float) -> Iterator[None]:
    """Hold the registered model's Prefect global concurrency slot: every deployment, worker and laptop
    that talks to the same Prefect API serializes register + promote here (the fcntl lock in
    tasks.register covers runs that share only a filesystem)."""
    from prefect.concurrency.sync import concurrency

    if is_temporary(os.environ.get("PREFECT_API_URL")):
        # The CLI's own temporary server: nobody else talks to it, and its leases live in its memory
        # (no repossessor in an ephemeral server), so a slot taken by a run killed with -9 would stay
        # taken in the shared database and block every later run. The workspace's file lock serializes.
        yield
        return
    name = ensure_registry_limit(model_name)
    with concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True):
        yield
