"""Retrain when data lands: the deployment trigger `qlora-ops deploy` installs on the retraining deployment.

Debounce, in Prefect's own trigger semantics (no state of ours anywhere):

    DeploymentEventTrigger(after={drop}, expect={drop}, posture=Proactive, threshold=1,
                           within=orchestration.debounce_s, match={resource id: <data.source>/*},
                           for_each={qlora-ops.store})

reads "after a drop into data.source, expect another drop within debounce_s; when none comes, run the
deployment". The server (prefect/server/events/triggers.py) opens a window at the first drop; each
further drop inside it closes that window and opens a new one from itself; the window that ends with no
drop fires once. So a burst of uploads is one run, started debounce_s after its last file: every file of
the burst is in the snapshot that run takes (trailing edge). A Reactive trigger with `within` would fire
at the first file and drop the rest of the window's events on the floor: files 2..n of a burst would then
wait for the cron. The cost: drops arriving more often than every debounce_s for ever postpone the run;
the cron schedule stays as the safety net. Each run still ends Skipped when the data did not change.

`for_each` is needed although every matched drop carries the same store label: for a Proactive trigger
without for_each, the server's periodic evaluation opens an empty window every `within` seconds and fires
it with no event at all (ensure_bucket with the empty key in proactive_evaluation).

Installed the way Prefect installs a deployment's `triggers` (RunnerDeployment._create_triggers_sync):
delete the automations the deployment owns, then create one automation per trigger, owned by it. Any
other automation owned by the deployment is replaced by that; automations not owned by a deployment
(e.g. the heartbeat automation) are untouched.
"""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from uuid import UUID

from qlora_ops.flows.events import EVENT, STORE_LABEL, local_url, source_glob
from qlora_ops.tasks.core.config import Params
from qlora_ops.tasks.core.paths import ws_path
from qlora_ops.tasks.core.secrets import redact_url
from qlora_ops.tasks.data.sources import is_url


def source_url(params: Params, workspace: Path) -> str | None:
    """The URL drops into data.source carry as resource ids (a directory resolved against the workspace)."""
    src = params.data.source
    if not src:
        return None
    if is_url(src):
        return src
    return local_url(ws_path(workspace, src.removeprefix("file://")))


def retrain_triggers(params: Params, workspace: Path, deployment_name: str) -> list:
    """The deployment's triggers: one debounced drop trigger when data.source is set, else none."""
    from prefect.events import DeploymentEventTrigger

    url = source_url(params, workspace)
    if url is None:
        return []
    o = params.orchestration
    return [DeploymentEventTrigger(
        name=f"{deployment_name}: retrain on data drop",
        description=f"Run {deployment_name} {o.debounce_s:g} s after the last drop into {redact_url(url)} "
                    "(orchestration.debounce_s); installed by `qlora-ops deploy`.",
        match={"prefect.resource.id": source_glob(url)},
        after={EVENT}, expect={EVENT}, for_each={STORE_LABEL},
        posture="Proactive", threshold=1, within=timedelta(seconds=o.debounce_s),
        parameters=None)]  # the deployment's own parameters (its params file)


def install_triggers(client, deployment_id: UUID, triggers: list) -> list[str] | None:
    """Prefect's recipe for a deployment's triggers, on a sync client; the automation ids, or None when
    the server has no automations API."""
    from prefect.exceptions import PrefectHTTPStatusError

    try:
        client.delete_resource_owned_automations(f"prefect.deployment.{deployment_id}")
    except PrefectHTTPStatusError as e:
        if e.response.status_code == 404:  # a server without automations: nothing to install into
            return None
        raise
    made = []
    for trigger in triggers:
        trigger.set_deployment_id(deployment_id)
        made.append(str(client.create_automation(trigger.as_automation())))
    return made
