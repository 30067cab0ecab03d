"""`qlora-ops deploy`: the Prefect deployments and schedule from params (flows.deploy), on the server
PREFECT_API_URL names."""
from __future__ import annotations

import sys
from pathlib import Path

from qlora_ops.flows.cli.exit_codes import EXIT, classify


def deploy_command(a) -> int:
    from qlora_ops.flows.deploy import deploy_file  # imports the flows, hence Prefect and torch: deploy only
    try:
        for what, ident in deploy_file(Path(a.workspace) / a.params, Path(a.workspace)).items():
            print(f"{what}: {ident}")
    except Exception as e:
        kind = classify(e)
        print(f"qlora-ops: deploy failed: {e}", file=sys.stderr)
        return EXIT[kind if kind != "internal" else "service"]
    return 0
