"""`qlora-ops deploy`: the two deployments, the schedule, the registry slot and the dead-worker automation,
from params.

    PREFECT_API_URL=http://127.0.0.1:4200/api qlora-ops deploy --params params/team.yaml

- qlora-retrain/<orchestration.deployment> on orchestration.pool (CPU): data, versioning, gates,
  registration; the cron schedule; one run at a time, later ones queued (ENQUEUE).
- qlora-model-stage/<orchestration.deployment> on orchestration.gpu_pool (only when set): training,
  evaluation and merge, started by the parent with run_deployment.
- with data.source set, a trigger on the retraining deployment: a drop into the source starts a run
  orchestration.debounce_s after the last drop of a burst (flows/triggers.py).
- Their runs send flow-run heartbeats every orchestration.heartbeat_s (PREFECT_FLOWS_HEARTBEAT_FREQUENCY
  in the deployments' env), and the automation "qlora-ops: crash <deployment> runs without heartbeats"
  marks a run of either deployment Crashed after orchestration.heartbeat_timeout_s without one: a worker
  container or node that died leaves no one to report its run, and a Running run would hold the parent
  for up to orchestration.timeouts.model_stage. The parent starts a Crashed model stage again.
- Before its first heartbeat a run is Pending (a worker took it, its process has not started): the automation
  "qlora-ops: crash <deployment> runs stuck pending" marks it Crashed after orchestration.pending_timeout_s,
  so a worker that dies right after taking a run costs minutes, not timeouts.model_stage.

Both pull their code from the worker's own checkout (`{{ $QLORA_OPS_HOME }}`), so nothing is built or
pushed; each worker sets QLORA_OPS_HOME to where it has this repo. Deploying again updates in place.
"""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from qlora_ops.flows.model_stage import model_stage
from qlora_ops.flows.registry_slot import ensure_registry_limit
from qlora_ops.flows.remote_stage import MODEL_STAGE_FLOW
from qlora_ops.flows.retrain import retrain
from qlora_ops.tasks.core.config import Params
from qlora_ops.tasks.core.config import ParamsError, load_params
from qlora_ops.tasks.data.workspace_file import is_source_tree
from qlora_ops.flows.triggers import install_triggers, retrain_triggers, source_url

PULL = [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $QLORA_OPS_HOME }}"}}]
SCHEDULE_SLUG = "qlora-ops-schedule"
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"


def entrypoint(workspace: Path, flow: str) -> str:
    """The clone: the flow's file in the worker's checkout. A workspace of your own (the installed package):
    the module, which Prefect imports from the worker's installed qlora-ops."""
    return f"flows/{flow}.py:{flow}" if is_source_tree(workspace) else f"qlora_ops.flows.{flow}:{flow}"


def deploy(params: Params, params_rel: str, workspace: Path = Path(".")) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy, ConcurrencyOptions
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.utilities.callables import parameter_schema

    o = params.orchestration
    made, ids = {}, []
    with get_client(sync_client=True) as c:
        specs = [(retrain, entrypoint(workspace, "retrain"), o.pool, {"params_path": params_rel, "workspace": "."}, True)]
        if o.gpu_pool:
            specs.append((model_stage, entrypoint(workspace, "model_stage"), o.gpu_pool, {"workspace": "."}, False))
        for fl, entry, pool, defaults, parent in specs:
            schedules = ([DeploymentScheduleCreate(schedule=CronSchedule(cron=o.schedule, timezone=o.timezone),
                                                   active=True, slug=SCHEDULE_SLUG)]
                         if parent and o.schedule else [])
            dep_id = c.create_deployment(
                flow_id=c.create_flow_from_name(fl.name), name=o.deployment, entrypoint=entry, work_pool_name=pool,
                parameters=defaults, parameter_openapi_schema=parameter_schema(fl).model_dump_for_openapi(),
                enforce_parameter_schema=True, pull_steps=PULL, schedules=schedules,
                # Merged over the pool's env defaults key by key (prefect.workers.base): heartbeats on.
                job_variables={"env": {HEARTBEAT_ENV: str(o.heartbeat_s)}},
                # One scheduled retrain at a time per deployment; a late one waits instead of being dropped.
                concurrency_limit=1 if parent else None,
                concurrency_options=ConcurrencyOptions(collision_strategy=ConcurrencyLimitStrategy.ENQUEUE) if parent else None,
                description=(fl.__doc__ or "").strip().splitlines()[0] if fl.__doc__ else None)
            made[f"{fl.name}/{o.deployment}"] = str(dep_id)
            ids.append(str(dep_id))
            if parent:
                made.update(deploy_drop_trigger(c, params, workspace, dep_id, f"{fl.name}/{o.deployment}"))
    made["global concurrency limit"] = ensure_registry_limit(params.registry.model_name)
    made["automation"] = crash_zombies(o.deployment, ids, o.heartbeat_timeout_s)
    made["pending automation"] = crash_stuck_pending(o.deployment, ids, o.pending_timeout_s)
    assert MODEL_STAGE_FLOW == model_stage.name  # the parent finds the GPU stage by this name
    return made


def crash_zombies(deployment: str, deployment_ids: list[str], timeout_s: float) -> str:
    """Prefect's recipe for zombie flow runs (docs: "How to detect and respond to zombie flows"), as
    written: after each heartbeat of a flow run, expect any event of that run (another heartbeat, a state
    change) within `timeout_s`, else change its state to Crashed. One change: it watches only the runs of
    our deployments (match_related), because the recipe's "every flow run" with our window would crash
    other flows on a shared server that beat at Prefect's default 180 s. Created, or updated in place;
    returns "<name>: <id>"."""
    return _crash_after(f"qlora-ops: crash {deployment} runs without heartbeats", "prefect.flow-run.heartbeat",
                        deployment_ids, timeout_s,
                        "Marks a run of the qlora-ops deployments Crashed when its heartbeats stop (dead worker or node); "
                        "the parent flow starts a Crashed model stage again. Installed by `qlora-ops deploy`.",
                        f"Flow run marked as crashed due to missing heartbeats (none for {timeout_s:g} s: its worker "
                        "or node died).")


def crash_stuck_pending(deployment: str, deployment_ids: list[str], timeout_s: float) -> str:
    """The same recipe for the gap before the first heartbeat: after a run of our deployments turns Pending (a
    worker took it), expect its next event (Running, or any other state) within `timeout_s`, else Crashed. A
    worker that dies between taking a run and starting its process leaves it Pending, where no heartbeat
    automation can see it; the parent then starts the stage again instead of waiting timeouts.model_stage."""
    return _crash_after(f"qlora-ops: crash {deployment} runs stuck pending", "prefect.flow-run.Pending",
                        deployment_ids, timeout_s,
                        "Marks a run of the qlora-ops deployments Crashed when it stays Pending (its worker died before "
                        "starting it); the parent flow starts a Crashed model stage again. Installed by `qlora-ops deploy`.",
                        f"Flow run marked as crashed: Pending for {timeout_s:g} s without starting (its worker died "
                        "after taking it, or could not start it).")


def _crash_after(name: str, after: str, deployment_ids: list[str], timeout_s: float, description: str,
                 message: str) -> str:
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    wanted = Automation(
        name=name, description=description,
        trigger=EventTrigger(
            after={after},
            expect={"prefect.flow-run.*"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.role": "deployment",
                                                 "prefect.resource.id": [f"prefect.deployment.{i}" for i in deployment_ids]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=timeout_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=message)],
    )
    try:
        existing = Automation.read(name=name)
    except ValueError:  # "Automation with name ... not found"
        return f"{name}: {wanted.create().id}"
    wanted.id = existing.id
    wanted.update()
    return f"{name}: {existing.id}"


def deploy_file(params_path: Path, workspace: Path) -> dict[str, str]:

    params = load_params(params_path)
    try:
        rel = params_path.resolve().relative_to(workspace.resolve()).as_posix()
    except ValueError:
        raise ParamsError(f"{params_path}: deployed params must live inside the checkout {workspace} "
                          "(workers read them from their own checkout)") from None
    return deploy(params, rel, workspace)


def deploy_drop_trigger(client, params: Params, workspace: Path, deployment_id, name: str) -> dict[str, str]:
    """Event-driven retraining: (re)install the retraining deployment's drop trigger (flows/triggers.py)."""

    triggers = retrain_triggers(params, workspace, name)
    made = install_triggers(client, deployment_id, triggers)
    if made is None:
        return {"drop trigger": "not installed: this Prefect server has no automations API"}
    if not triggers:
        return {"drop trigger": "none (data.source is null: only the schedule starts runs)"}
    return {"drop trigger": f"{made[0]} (runs {params.orchestration.debounce_s:g} s after the last drop into "
                            f"{source_url(params, workspace)})"}
