"""`qlora-ops` command line.

    qlora-ops run                              # the whole loop on params/default.yaml
    qlora-ops run --params params/other.yaml   # another params file (inside the workspace)
    qlora-ops run --workspace /path/to/clone   # a workspace other than the current directory
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qlora-ops", description="QLoRA retraining loop: DVC -> train -> gates -> merge -> MLflow")
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the full loop")
    run.add_argument("--params", default="params/default.yaml", help="params YAML (default: %(default)s)")
    run.add_argument("--workspace", default=".", help="directory with dvc.yaml, params/ and data/ (default: cwd)")
    a = ap.parse_args(argv)

    # Entry-point side effects only (nothing at import): no hub at run time, quiet progress bars.
    for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
                 "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                 "TOKENIZERS_PARALLELISM": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}.items():
        os.environ.setdefault(k, v)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("qlora_ops").setLevel(logging.INFO)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    from flows.retrain import retrain
    from tasks.base_model import BaseModelError
    from tasks.config import ParamsError
    from tasks.train import DivergenceError
    from tasks.versioning import DvcError

    try:
        summary = retrain(params_path=a.params, workspace=a.workspace)
    except (ParamsError, DvcError, BaseModelError) as e:
        print(f"qlora-ops: error: {e}", file=sys.stderr)
        return 2
    except DivergenceError as e:
        print(f"qlora-ops: training diverged: {e}", file=sys.stderr)
        return 3
    return 0 if summary.get("passed") else 1


if __name__ == "__main__":
    sys.exit(main())
