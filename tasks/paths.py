"""Where things live inside a workspace (the directory holding dvc.yaml and params/)."""
from __future__ import annotations

import os
from pathlib import Path

from tasks.config import Params


def ws_path(workspace: Path, p: str | Path) -> Path:
    p = Path(p)
    return p if p.is_absolute() else Path(workspace) / p


def state_dir(workspace: Path, params: Params) -> Path:
    return ws_path(workspace, params.state_dir)


def tracking_uri(workspace: Path, params: Params) -> str:
    """params.registry.tracking_uri, else $MLFLOW_TRACKING_URI (how a deployed worker is pointed at a
    shared server), else a SQLite store in the state dir."""
    if params.registry.tracking_uri:
        return params.registry.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{state_dir(workspace, params).resolve()}/mlflow.db"


def artifact_root(workspace: Path, params: Params) -> Path:
    return state_dir(workspace, params).resolve() / "mlartifacts"
