"""`python -m qlora_ops.tasks.data sample|prepare`: the DVC stages' commands (dvc.yaml).

    python -m qlora_ops.tasks.data sample --out data/raw/stdlib_docstrings.jsonl   # stage `sample` (tasks/data/samples.py)
    python -m qlora_ops.tasks.data prepare --params params/default.yaml            # stage `prepare` (tasks/data/prepare.py)
"""
import argparse
import json
import sys
from pathlib import Path

from qlora_ops.tasks.core.config import ParamsError, load_params
from qlora_ops.tasks.core.util import die_with_parent_if_tied
from qlora_ops.tasks.data.prepare import prepare
from qlora_ops.tasks.data.readers import DataError
from qlora_ops.tasks.data.samples import build_sample


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qlora_ops.tasks.data")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample", help="build a built-in sample dataset (tasks/data/samples.py)")
    s.add_argument("--out", required=True)
    s.add_argument("--task", choices=["docstrings", "free-text"], default="docstrings",
                   help="docstrings: the default label task; free-text: one-line docstring summaries")
    p = sub.add_parser("prepare", help="validate, dedupe, split and format the raw data")
    p.add_argument("--params", required=True)
    p.add_argument("--workspace", default=".")
    a = ap.parse_args(argv)
    die_with_parent_if_tied()
    try:
        if a.cmd == "sample":
            print(f"wrote {build_sample(Path(a.out), a.task)} rows to {a.out}")
        else:
            print(json.dumps(prepare(load_params(a.params), Path(a.workspace))))
    except (DataError, ParamsError) as e:
        print(f"error: {e}", file=sys.stderr)  # exit 2 = bad data or params, no traceback
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
