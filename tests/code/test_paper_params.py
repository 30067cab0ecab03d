"""params/paper.yaml: the QLoRA paper's recipe (docs/training.md, "Defaults and the QLoRA paper") loads as
params and holds the paper's values, so the file and the docs' paper column cannot drift apart silently."""
from __future__ import annotations

from pathlib import Path

from qlora_ops.tasks.core.config import load_params

ROOT = Path(__file__).resolve().parents[2]


def test_paper_params_load_and_hold_the_papers_recipe():
    p = load_params(ROOT / "params" / "paper.yaml")
    q, lo, t = p.quantization, p.lora, p.training
    assert (q.quant_type, q.double_quant, q.compute_dtype) == ("nf4", True, "bfloat16")
    assert (lo.r, lo.alpha, lo.dropout, lo.target_modules) == (64, 16, 0.1, "all-linear")
    assert (t.lr, t.lr_scheduler, t.max_grad_norm, t.batch_size * t.grad_accum) == (2e-4, "constant", 0.3, 16)
    assert (t.optimizer, t.weight_decay, t.length_bucketing, t.gradient_checkpointing) == ("paged_adamw_32bit", 0.0,
                                                                                           True, True)
    # its own prepared data and registered model: it never competes with the default recipe's champion
    default = load_params(ROOT / "params" / "default.yaml")
    assert p.data.prepared != default.data.prepared and p.registry.model_name != default.registry.model_name
    doc = (ROOT / "docs" / "training.md").read_text()
    assert "| `training.lr` | 1e-3 | 2e-4 |" in doc and "| `training.max_grad_norm` | 1.0 | 0.3 |" in doc
