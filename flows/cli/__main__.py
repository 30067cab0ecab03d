"""`python -m qlora_ops.flows.cli ...`: the same as the `qlora-ops` console script."""
import sys

from qlora_ops.flows.cli import main

if __name__ == "__main__":
    sys.exit(main())
