"""Render infra/prefect/work-pool-gpu-kubernetes.json into the Job the Kubernetes worker would create.

Runs prefect-kubernetes' own code, with no cluster: the pool's defaults -> KubernetesWorkerJobConfiguration
-> prepare_for_flow_run (which adds the worker's own environment, its auth string included) ->
KubernetesWorker._create_job (which swaps that auth string for a Secret reference when the worker's
PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_* settings are set) with the API call
replaced by a capture. Prints the Job as YAML; .ci/scan.sh runs checkov on it and tests/code/test_infra.py
validates it against the Kubernetes API schema.

    python .ci/render_gpu_job.py > job.yaml    # with the worker's environment in this process's env
"""
from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path
from unittest import mock

TEMPLATE = Path(__file__).resolve().parent.parent / "infra" / "prefect" / "work-pool-gpu-kubernetes.json"


async def _render(template: dict) -> dict:
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes import worker as kworker

    values = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    # A client that is never called: the template holds no block or variable references to resolve, and
    # without one Prefect would start a temporary local server just to resolve nothing.
    cfg = await kworker.KubernetesWorkerJobConfiguration.from_template_and_values(template, values, client=mock.AsyncMock())
    cfg.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="render-check"))
    created: list[dict] = []

    class Batch:  # stands in for the Kubernetes API: keeps what the worker would send
        def __init__(self, *a, **k):
            pass

        async def create_namespaced_job(self, namespace, body):
            created.append(body)
            return mock.Mock()

    with mock.patch.object(kworker, "BatchV1Api", Batch):
        await kworker.KubernetesWorker(work_pool_name="qlora-ops-gpu")._create_job(cfg, client=None)
    return created[0]


def render(template_path: Path = TEMPLATE) -> dict:
    """The worker's Prefect client settings come from this process's environment, read now (a process
    that imported prefect earlier keeps the settings of that moment otherwise)."""
    import os

    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    updates = {s: os.environ.get(s.name) for s in (PREFECT_API_URL, PREFECT_API_AUTH_STRING)}
    with temporary_settings(updates=updates):
        return asyncio.run(_render(json.loads(Path(template_path).read_text())))


if __name__ == "__main__":
    import yaml

    yaml.safe_dump(render(Path(sys.argv[1]) if len(sys.argv) > 1 else TEMPLATE), sys.stdout, sort_keys=False)
