"""One registry writer at a time, everywhere: the registered model's Prefect global concurrency slot.

Every write to the registry (a run's register + promote, `qlora-ops promote`, `qlora-ops rollback`) goes
through `registry_writer`. Against a shared store (is_shared: every tracking URI but a local file store
or a sqlite file in the workspace's state dir: http(s), databricks, postgres, mysql, a sqlite file elsewhere) it takes the model's slot on
the team's Prefect API, or refuses before any work: a writer without it could tag a live writer's
in-flight version `abandoned` (tasks.registry.register trusts the lock) and both could move the champion alias.
Loopback counts as shared (a port-forward to the team's server is 127.0.0.1 too).

"The team's Prefect API" is checked, not assumed: the first writer records the id of the slot it holds
on the registered model (tag `qlora_ops.registry_lock`); a writer whose PREFECT_API_URL has another slot
(a laptop's own `prefect server start`, the CLI's temporary server) is refused, naming the API to use.
A private store (a local file store, or the sqlite file in the workspace's state dir) needs no Prefect: the
fcntl lock in tasks.registry.register serializes its writers, and a configured, real Prefect API's slot is
taken as well. Every writer passes its state dir (`private_dir`); without it a sqlite store counts as shared.
"""
from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from qlora_ops.flows.faults import ServiceUnavailable
from qlora_ops.flows.prefect_server import is_temporary
from qlora_ops.tasks.core.secrets import redact_url

LOCK_TAG = "qlora_ops.registry_lock"          # on the registered model: id of the slot its writers share
LOCK_API_TAG = "qlora_ops.registry_lock_api"  # where that slot lives (redacted URL), for the message only


class RegistryLockUnavailable(ServiceUnavailable):
    """A registry write to a shared tracking server without the one lock all its writers share (exit 4)."""


def registry_limit_name(model_name: str) -> str:
    return "qlora-ops-registry-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", model_name)


def _registry_limit(model_name: str):
    """The model's global concurrency limit, created (1 slot) if missing: Prefect requires limits to exist."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = registry_limit_name(model_name)
    with get_client(sync_client=True) as c:
        try:
            return c.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                c.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass  # another writer created it between our read and write
            return c.read_global_concurrency_limit_by_name(name)


def ensure_registry_limit(model_name: str) -> str:
    return _registry_limit(model_name).name


def _sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (None for an in-memory or non-sqlite store)."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    path = urlparse(tracking_uri).path
    return Path(path).resolve() if path and path != "/:memory:" and ":memory:" not in path else None


def is_shared(tracking_uri: str, private_dir: Path | None = None) -> bool:
    """Whether writers other than this workspace's can reach the store, so that they must share one lock.

    Private: a local file store (a path, or file:) and a sqlite file inside `private_dir`, the workspace's
    state dir (the default store, <state_dir>/mlflow.db, which only this workspace's runs and commands
    open; the fcntl lock beside it serializes them). Shared: every other store: http(s) (loopback too: a
    port-forward to the team's server is 127.0.0.1), databricks, every SQL database URI (postgresql,
    mysql, mssql, ...), and a sqlite file anywhere else (named by a user or the environment, it may be on a
    disk two workspaces reach; we cannot tell that it is not)."""
    if tracking_uri.lower().startswith("databricks"):  # "databricks", "databricks-uc", "databricks://profile"
        return True
    scheme = urlparse(tracking_uri).scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and tracking_uri[1:3] in (":\\", ":/")):  # a path (or C:\)
        return False
    if scheme == "sqlite":
        db = _sqlite_file(tracking_uri)
        if db is None:
            return False  # in memory: this process only
        return private_dir is None or not db.is_relative_to(Path(private_dir).resolve())
    return True


def is_remote(tracking_uri: str, private_dir: Path | None = None) -> bool:
    """Kept name: a store other writers can reach (is_shared)."""
    return is_shared(tracking_uri, private_dir)


def prefect_api_url() -> str | None:
    """The Prefect API this process talks to: Prefect's settings once Prefect is imported (a profile or
    temporary_settings count), else the environment (the CLI decides before importing Prefect)."""
    if "prefect.settings" in sys.modules:
        from prefect.settings import get_current_settings

        return get_current_settings().api.url
    return os.environ.get("PREFECT_API_URL")


def _how_to(model_name: str) -> str:
    return (f"every writer of {model_name!r} (scheduled runs, promote, rollback) must hold its slot "
            f"{registry_limit_name(model_name)!r} on the team's Prefect API: export PREFECT_API_URL=<the API the "
            "workers use, e.g. http://prefect-server:4200/api> and PREFECT_API_AUTH_STRING (docs/deploy.md), "
            "then rerun")


def check_writer(tracking_uri: str, model_name: str, private_dir: Path | None = None) -> None:
    """Before any work: refuse a writer of a shared registry that cannot hold the shared lock. Needs no
    Prefect import (the CLI calls it before its temporary server would start). `private_dir`: the
    workspace's state dir (a sqlite store inside it is private; see is_shared)."""
    if not is_shared(tracking_uri, private_dir):
        return
    api = prefect_api_url()
    if not api or is_temporary(api):
        where = "PREFECT_API_URL is unset" if not api else "PREFECT_API_URL is this run's temporary Prefect server"
        raise RegistryLockUnavailable(f"refusing to write the registry at {redact_url(tracking_uri)} (a store "
                                      f"other workspaces can reach: flows.registry_slot.is_shared) without its lock: {where}; {_how_to(model_name)}")


def _check_binding(tracking_uri: str, model_name: str, limit, take: bool) -> None:
    """The registered model's recorded slot is this API's slot (recording it when `take` and none is)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    c, mine = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri), str(limit.id)
    try:
        tags = dict(c.get_registered_model(model_name).tags or {})
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        if not take:
            return
        try:  # the model's first writer: born with the tag (register_model accepts an existing model)
            c.create_registered_model(model_name, tags={LOCK_TAG: mine, LOCK_API_TAG: redact_url(prefect_api_url())})
            return
        except MlflowException as e2:
            if e2.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            tags = dict(c.get_registered_model(model_name).tags or {})
    if LOCK_TAG not in tags:
        if take:
            c.set_registered_model_tag(model_name, LOCK_TAG, mine)
            c.set_registered_model_tag(model_name, LOCK_API_TAG, redact_url(prefect_api_url()))
        return
    if tags[LOCK_TAG] != mine:
        raise RegistryLockUnavailable(
            f"refusing to write {model_name!r}: its writers serialize on the slot {tags[LOCK_TAG]} of the Prefect "
            f"API at {tags.get(LOCK_API_TAG, '?')} (registered-model tag {LOCK_TAG}), but PREFECT_API_URL="
            f"{redact_url(prefect_api_url())} holds another ({mine}); {_how_to(model_name)}. If that Prefect server "
            f"was rebuilt and this one replaces it for every writer, delete the tag {LOCK_TAG} on {model_name!r} once")


def check_binding(tracking_uri: str, model_name: str, private_dir: Path | None = None) -> None:
    """Before any work, where Prefect may be imported: a shared registry's writer talks to the Prefect API
    its other writers use (read-only; registry_writer records it under the slot)."""
    check_writer(tracking_uri, model_name, private_dir)
    if is_shared(tracking_uri, private_dir):
        _check_binding(tracking_uri, model_name, _registry_limit(model_name), take=False)


# The slot's lease, renewed in the background while a writer holds it (Prefect's own renewal loop). Prefect's
# default is 300 s: a writer killed with -9 then blocks every other writer (the next scheduled run, a
# `promote`) for five minutes. 60 s is the shortest lease the server accepts; a live writer renews it
# every 45 s, so only a dead one loses it.
LEASE_S = 60.0


@contextmanager
def registry_writer(tracking_uri: str, model_name: str, timeout_s: float,
                    private_dir: Path | None = None) -> Iterator[None]:
    """Hold the one lock every writer of `model_name` shares, or refuse (RegistryLockUnavailable, exit 4).
    Shared tracking server: the model's slot on the team's Prefect API, always, checked to be the one its
    other writers use. Local store: the slot when a real Prefect API is configured, else nothing here
    (the caller's fcntl lock serializes the writers of one filesystem). A slot's lease outlives a writer
    killed with -9 by at most LEASE_S (then Prefect's repossessor frees it). `private_dir`: see is_shared."""
    check_writer(tracking_uri, model_name, private_dir)
    api = prefect_api_url()
    if not api or is_temporary(api):
        # A temporary server (no shared store here, see check_writer): nobody else talks to it, and its
        # leases live in its memory, so a slot taken by a run killed with -9 would stay taken.
        yield
        return
    from prefect.concurrency.sync import concurrency

    limit = _registry_limit(model_name)
    if limit.limit != 1 or not limit.active:
        raise RegistryLockUnavailable(f"the global concurrency limit {limit.name!r} on {redact_url(api)} has "
                                      f"{limit.limit} slot(s), active={limit.active}: registry writes need exactly "
                                      "one active slot; set it back (`prefect global-concurrency-limit update`) or delete it (it is recreated)")
    if limit.active_slots >= limit.limit:  # said once, so a waiting writer is not mistaken for a hung one
        print(f"waiting for the registry slot {limit.name!r} on {redact_url(api)}: another writer of {model_name!r} "
              f"holds it (up to {timeout_s:g} s, orchestration.timeouts.registry)", flush=True)
    with concurrency(limit.name, occupy=1, timeout_seconds=timeout_s, strict=True, lease_duration=LEASE_S):
        if is_shared(tracking_uri, private_dir):
            _check_binding(tracking_uri, model_name, limit, take=True)
        yield


@contextmanager
def registry_slot(model_name: str, timeout_s: float, private_dir: Path | None = None) -> Iterator[None]:
    """registry_writer for the tracking URI MLflow is set to (kept for callers that set it first)."""
    import mlflow

    with registry_writer(mlflow.get_tracking_uri(), model_name, timeout_s, private_dir):
        yield
