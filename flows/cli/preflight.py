"""What every command that reads params does first: load them and check the services they name, so a bad
key or a dead tracking server / Prefect API is one clear line in seconds, before any lock or work."""
from __future__ import annotations

import os
from pathlib import Path

from qlora_ops.flows.cli.exit_codes import fail
from qlora_ops.flows.runtime import ServiceUnavailable, check_services
from qlora_ops.tasks.core.config import ParamsError, load_params
from qlora_ops.tasks.core.paths import tracking_uri, ws_path


def preflight(a):
    """(workspace, params, tracking URI), or the exit code after one clear line: a bad params file, or a
    service that does not answer (the tracking server, the Prefect API)."""
    ws = Path(a.workspace).resolve()
    try:
        params = load_params(ws_path(ws, a.params))
        uri = tracking_uri(ws, params)
        check_services(uri, os.environ.get("PREFECT_API_URL"))
    except ParamsError as e:
        return fail("bad_input", e)
    except ServiceUnavailable as e:
        return fail("service", e)
    return ws, params, uri
