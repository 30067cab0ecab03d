"""MLflow users and permissions for the team stack: one-shot, idempotent, run as the MLflow admin.

Compose service `mlflow-setup`, k8s Job `mlflow-setup` (the qlora-ops-init ConfigMap holds a copy of this
file; tests/code/test_infra.py keeps them equal). It runs in the MLflow server image: mlflow + stdlib only.

    role      user (infra/.env)           gets
    trainer   MLFLOW_TRAINER_USERNAME     EDIT on the experiment only: the GPU jobs log runs, metrics, adapters
                                          and the merged model there; READ on the registry experiment and the
                                          registered model (no version, tag or alias write; no write to
                                          the bytes a version serves)
    worker    MLFLOW_WORKER_USERNAME      the registrar: EDIT on the experiment, the registry experiment
                                          (<experiment>-registry: the copies versions are registered from)
                                          and the registered model: register versions with their digests,
                                          move aliases (the flow promotes by policy)
    promoter  MLFLOW_PROMOTER_USERNAME    MANAGE on the registered model: `qlora-ops promote/rollback`,
                                          grant others access to it
    people    one user each (see docs)    READ on everything (default_permission in the server's ini)

The admin login stays with the MLflow server and this job; no worker holds it. Passwords in infra/.env
win: a re-run resets each user's password to .env's and re-grants exactly the permissions above.
"""
from __future__ import annotations

import os
import sys
import time
import urllib.request

from mlflow.exceptions import MlflowException

GRANTS = (  # (role, resource type, which resource, permission)
    ("TRAINER", "experiment", "experiment", "EDIT"),
    # Explicit READ (not just the default): a re-run takes back whatever the trainer held there before.
    ("TRAINER", "experiment", "registry_experiment", "READ"),
    ("TRAINER", "registered_model", "model", "READ"),
    ("WORKER", "experiment", "experiment", "EDIT"),
    ("WORKER", "experiment", "registry_experiment", "EDIT"),
    ("WORKER", "registered_model", "model", "EDIT"),
    ("PROMOTER", "registered_model", "model", "MANAGE"),
)
ROLES = ("TRAINER", "WORKER", "PROMOTER")
REGISTRY_SUFFIX = "-registry"  # as tasks.registry.register.registry_experiment names it


def need(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        sys.exit(f"{name} is not set (infra/.env)")
    return value


def wait_for(uri: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=5):  # nosec B310: our own server's URL
                return
        except OSError as e:
            if time.time() > deadline:
                sys.exit(f"MLflow at {uri} did not answer /health in {timeout:.0f}s: {e}")
            time.sleep(2)


def ensure_user(auth, username: str, password: str) -> None:
    try:
        auth.get_user(username)
    except MlflowException:
        auth.create_user(username, password)
        print(f"created user {username}")
    else:
        auth.update_user_password(username, password)
    auth.update_user_admin(username, False)  # a role user is never an admin, whatever it was before


def main() -> None:
    import mlflow
    from mlflow.server import get_app_client

    uri = os.environ.get("MLFLOW_TRACKING_URI", "http://mlflow:5000").rstrip("/")
    need("MLFLOW_TRACKING_USERNAME"), need("MLFLOW_TRACKING_PASSWORD")  # the admin: mlflow's client reads them
    experiment = os.environ.get("QLORA_MLFLOW_EXPERIMENT", "qlora-ops")
    model = os.environ.get("QLORA_MLFLOW_MODEL", "qlora-ops-smollm2")
    registry_experiment = experiment + REGISTRY_SUFFIX
    users = {role: (need(f"MLFLOW_{role}_USERNAME"), need(f"MLFLOW_{role}_PASSWORD")) for role in ROLES}
    if len({u for u, _ in users.values()} | {os.environ["MLFLOW_TRACKING_USERNAME"]}) != len(ROLES) + 1:
        sys.exit("MLFLOW_ADMIN_USERNAME, MLFLOW_TRAINER_USERNAME, MLFLOW_WORKER_USERNAME and "
                 "MLFLOW_PROMOTER_USERNAME must differ")
    wait_for(uri, float(os.environ.get("QLORA_MLFLOW_WAIT_S", "300")))

    auth = get_app_client("basic-auth", tracking_uri=uri)
    for username, password in users.values():
        ensure_user(auth, username, password)

    # The experiments and the registered model exist before anyone is granted rights on them, so the
    # workers never need to create (and so own) them.
    client = mlflow.MlflowClient(tracking_uri=uri)

    def experiment_id(name: str) -> str:
        exp = client.get_experiment_by_name(name)
        return exp.experiment_id if exp else client.create_experiment(name)

    exp_id, registry_exp_id = experiment_id(experiment), experiment_id(registry_experiment)
    try:
        client.get_registered_model(model)
    except MlflowException:
        client.create_registered_model(model, description="qlora-ops: merged QLoRA models; alias `champion` is served")
    ids = {"experiment": exp_id, "registry_experiment": registry_exp_id, "model": model}

    for role, resource_type, which, permission in GRANTS:
        username = users[role][0]
        try:  # grant is create-only; revoke first so a re-run converges on exactly this permission
            auth.revoke_user_permission(username, resource_type, ids[which])
        except MlflowException:
            pass
        auth.grant_user_permission(username, resource_type, ids[which], permission)
        print(f"{username}: {permission} on {resource_type} {ids[which]}")
    print(f"MLflow users ready at {uri}: experiment {experiment!r} (id {exp_id}), registry experiment "
          f"{registry_experiment!r} (id {registry_exp_id}), registered model {model!r}")


if __name__ == "__main__":
    main()
