"""The services a run needs answer, in seconds: MLflow's client would retry a dead server for minutes."""
from __future__ import annotations

import urllib.error
import urllib.request

from qlora_ops.flows.faults import ServiceUnavailable
from qlora_ops.tasks.core.secrets import redact_url


def probe(url: str, timeout: float) -> str | None:
    """None if something answered `url` below HTTP 500 (401/403/404 count: a server is there), else why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return None if r.status < 500 else f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return None if e.code < 500 else f"HTTP {e.code}"  # 401/403/404: something answered
    except (OSError, ValueError) as e:
        return str(getattr(e, "reason", e))


def check_services(tracking_uri: str, prefect_api: str | None, timeout: float = 5.0) -> None:
    checks = []
    if tracking_uri.startswith(("http://", "https://")):
        checks.append(("MLflow tracking server", tracking_uri, tracking_uri.rstrip("/") + "/health"))
    if prefect_api:
        checks.append(("Prefect API", prefect_api, prefect_api.rstrip("/") + "/health"))
    for what, shown, url in checks:
        if (err := probe(url, timeout)) is not None:
            raise ServiceUnavailable(f"{what} at {redact_url(shown)} did not answer within {timeout:g} s ({err}); "
                                     "start it or fix the URI, then rerun")
