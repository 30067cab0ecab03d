"""The metrics a gate can decide on: name, direction, range, and whether McNemar applies (DESIGN.md contract A).

Minimal stand-in written by the stats engineer so tasks.stats / tasks.gate can depend on the contract; the
metrics engineer's module (with score()) replaces it. Imports nothing heavy: tasks.stats and tasks.gate
import it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str                 # exact_match | token_f1 | rouge_l | chrf | json_match | nll
    higher_is_better: bool    # nll: False
    lo: float
    hi: float                 # range of one row's score (nll: 0, math.inf); all others 0..1
    binary: bool              # every row's score is 0 or 1 (exact_match only): McNemar applies
    kind: str                 # "generation" (scored on the generated answer) | "likelihood" (nll: needs the model)
    doc: str                  # one line: what it measures


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("exact_match", True, 0.0, 1.0, True, "generation",
           "1 when the normalised answer equals the normalised reference, else 0"),
    Metric("token_f1", True, 0.0, 1.0, False, "generation",
           "SQuAD-style F1 of the answer's and the reference's tokens"),
    Metric("rouge_l", True, 0.0, 1.0, False, "generation",
           "ROUGE-L F-measure: longest common subsequence of answer and reference"),
    Metric("chrf", True, 0.0, 1.0, False, "generation",
           "chrF character n-gram F-score, scaled to 0..1"),
    Metric("json_match", True, 0.0, 1.0, False, "generation",
           "share of the JSON reference's fields the answer matches (0 for invalid JSON)"),
    Metric("nll", False, 0.0, math.inf, False, "likelihood",
           "mean per-token negative log-likelihood of the reference under teacher forcing (lower is better)"),
)}


def get(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; valid names: {', '.join(METRICS)}") from None
