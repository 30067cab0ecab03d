"""`python -m qlora_ops.tasks.train`: one training in this process (or one rank of torchrun/accelerate)."""
import sys

from qlora_ops.tasks.train.loop import main

sys.exit(main())
