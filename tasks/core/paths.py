"""Where things live inside a workspace (the directory holding dvc.yaml and params/)."""
from __future__ import annotations

import os
from pathlib import Path

from qlora_ops.tasks.core.config import Params


def ws_path(workspace: Path, p: str | Path) -> Path:
    p = Path(p)
    return p if p.is_absolute() else Path(workspace) / p


def state_dir(workspace: Path, params: Params) -> Path:
    return ws_path(workspace, params.state_dir)


def tracking_uri(workspace: Path, params: Params) -> str:
    """params.registry.tracking_uri, else $MLFLOW_TRACKING_URI (how a deployed worker is pointed at a
    shared server), else a SQLite store in the state dir. A user:password@ in the URI is moved into
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD and the URI returned without it."""
    # Every flow gets its URI here before set_tracking_uri: MLflow's "View run ... at: <tracking URI>" line
    # on each run end is off (the summary prints the run id; the URI may carry credentials).
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    if params.registry.tracking_uri:
        return _credentials_to_env(params.registry.tracking_uri)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return _credentials_to_env(os.environ["MLFLOW_TRACKING_URI"])
    return f"sqlite:///{state_dir(workspace, params).resolve()}/mlflow.db"


def _credentials_to_env(uri: str) -> str:
    # MLflow's client writes the whole URL into every error it raises ("API request to http://user:pw@...
    # failed"), and those messages reach the console, Prefect's logs and run states. It reads the same
    # basic-auth credentials from these two variables, so the password never has to be in the URL.
    from urllib.parse import unquote, urlsplit, urlunsplit

    if not uri.startswith(("http://", "https://")):
        return uri
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
    os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def artifact_root(workspace: Path, params: Params) -> Path:
    return state_dir(workspace, params).resolve() / "mlartifacts"
