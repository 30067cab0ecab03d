"""Where things live inside a workspace (the directory holding dvc.yaml and params/)."""
from __future__ import annotations

from pathlib import Path

from tasks.config import Params


def ws_path(workspace: Path, p: str | Path) -> Path:
    p = Path(p)
    return p if p.is_absolute() else Path(workspace) / p


def state_dir(workspace: Path, params: Params) -> Path:
    return ws_path(workspace, params.state_dir)


def tracking_uri(workspace: Path, params: Params) -> str:
    if params.registry.tracking_uri:
        return params.registry.tracking_uri
    return f"sqlite:///{state_dir(workspace, params).resolve()}/mlflow.db"


def artifact_root(workspace: Path, params: Params) -> Path:
    return state_dir(workspace, params).resolve() / "mlartifacts"
