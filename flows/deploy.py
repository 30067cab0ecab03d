"""`qlora-ops deploy`: the two deployments, the schedule and the registry slot, from params.

    PREFECT_API_URL=http://127.0.0.1:4200/api qlora-ops deploy --params params/team.yaml

- qlora-retrain/<orchestration.deployment> on orchestration.pool (CPU): data, versioning, gates,
  registration; the cron schedule; one run at a time, later ones queued (ENQUEUE).
- qlora-model-stage/<orchestration.deployment> on orchestration.gpu_pool (only when set): training,
  evaluation and merge, started by the parent with run_deployment.
- with data.source set, a trigger on the retraining deployment: a drop into the source starts a run
  orchestration.debounce_s after the last drop of a burst (flows/triggers.py).

Both pull their code from the worker's own checkout (`{{ $QLORA_OPS_HOME }}`), so nothing is built or
pushed; each worker sets QLORA_OPS_HOME to where it has this repo. Deploying again updates in place.
"""
from __future__ import annotations

from pathlib import Path

from flows.model_stage import model_stage
from flows.retrain import MODEL_STAGE_FLOW, retrain
from flows.registry_slot import ensure_registry_limit
from tasks.config import Params

PULL = [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $QLORA_OPS_HOME }}"}}]
SCHEDULE_SLUG = "qlora-ops-schedule"


def deploy(params: Params, params_rel: str, workspace: Path = Path(".")) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy, ConcurrencyOptions
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.utilities.callables import parameter_schema

    o = params.orchestration
    made = {}
    with get_client(sync_client=True) as c:
        specs = [(retrain, "flows/retrain.py:retrain", o.pool, {"params_path": params_rel, "workspace": "."}, True)]
        if o.gpu_pool:
            specs.append((model_stage, "flows/model_stage.py:model_stage", o.gpu_pool, {"workspace": "."}, False))
        for fl, entry, pool, defaults, parent in specs:
            schedules = ([DeploymentScheduleCreate(schedule=CronSchedule(cron=o.schedule, timezone=o.timezone),
                                                   active=True, slug=SCHEDULE_SLUG)]
                         if parent and o.schedule else [])
            dep_id = c.create_deployment(
                flow_id=c.create_flow_from_name(fl.name), name=o.deployment, entrypoint=entry, work_pool_name=pool,
                parameters=defaults, parameter_openapi_schema=parameter_schema(fl).model_dump_for_openapi(),
                enforce_parameter_schema=True, pull_steps=PULL, schedules=schedules,
                # One scheduled retrain at a time per deployment; a late one waits instead of being dropped.
                concurrency_limit=1 if parent else None,
                concurrency_options=ConcurrencyOptions(collision_strategy=ConcurrencyLimitStrategy.ENQUEUE) if parent else None,
                description=(fl.__doc__ or "").strip().splitlines()[0] if fl.__doc__ else None)
            made[f"{fl.name}/{o.deployment}"] = str(dep_id)
            if parent:
                made.update(deploy_drop_trigger(c, params, workspace, dep_id, f"{fl.name}/{o.deployment}"))
    made["global concurrency limit"] = ensure_registry_limit(params.registry.model_name)
    assert MODEL_STAGE_FLOW == model_stage.name  # the parent finds the GPU stage by this name
    return made


def deploy_file(params_path: Path, workspace: Path) -> dict[str, str]:
    from tasks.config import ParamsError, load_params

    params = load_params(params_path)
    try:
        rel = params_path.resolve().relative_to(workspace.resolve()).as_posix()
    except ValueError:
        raise ParamsError(f"{params_path}: deployed params must live inside the checkout {workspace} "
                          "(workers read them from their own checkout)") from None
    return deploy(params, rel, workspace)


def deploy_drop_trigger(client, params: Params, workspace: Path, deployment_id, name: str) -> dict[str, str]:
    """Event-driven retraining: (re)install the retraining deployment's drop trigger (flows/triggers.py)."""
    from flows.triggers import install_triggers, retrain_triggers, source_url

    triggers = retrain_triggers(params, workspace, name)
    made = install_triggers(client, deployment_id, triggers)
    if made is None:
        return {"drop trigger": "not installed: this Prefect server has no automations API"}
    if not triggers:
        return {"drop trigger": "none (data.source is null: only the schedule starts runs)"}
    return {"drop trigger": f"{made[0]} (runs {params.orchestration.debounce_s:g} s after the last drop into "
                            f"{source_url(params, workspace)})"}
