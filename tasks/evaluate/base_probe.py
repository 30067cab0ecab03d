"""How well the base model already does before any training, on rows a run never tests on.

`qlora-ops init` calls it on the validation rows to set the gain bar: a base that already scores 0.8 on
exact match (a prompt naming the labels helps it) leaves 0.2 of headroom, and a fixed bar of 0.2 at the
interval's lower bound could then never be met, even by a perfect model. Validation rows, not test rows:
the test set's error rate is spent by the gates, so nothing is tuned on it.
"""
from __future__ import annotations

from pathlib import Path

from qlora_ops.tasks.core.config import Params
from qlora_ops.tasks.evaluate.predict import evaluate_model
from qlora_ops.tasks.model.base import resolve_base_model


def score_base(params: Params, workspace: Path, rows_path: Path, out_dir: Path,
               system_prompt: str | None = None) -> dict:
    """The base model (params.model.source) greedy-decoded on `rows_path` and scored on params.eval.metric:
    {metric, mean, n, seconds}."""
    base = resolve_base_model(params, Path(workspace))
    res = evaluate_model(params, "base", base, Path(rows_path), Path(out_dir), metrics=[params.eval.metric],
                         system_prompt=system_prompt)
    return {"metric": res["metric"], "mean": res["metrics"][res["metric"]], "n": res["n"],
            "seconds": round(res["eval_seconds"], 1)}
