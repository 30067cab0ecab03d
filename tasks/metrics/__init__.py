"""The metrics a test split can be scored with: what each measures, its direction and range, per-row scores.

    from qlora_ops.tasks import metrics
    metrics.get("rouge_l").higher_is_better              # True
    metrics.score("rouge_l", ["Read a file."], ["Read the file."])   # [0.857...] one score per row

Every metric scores each row on its own, so every comparison (gates, promotion) stays paired on the
same rows. Generation metrics score the generated answer against the reference; each is a local
`evaluate` module under tasks/metrics/<name>/ (local because `evaluate.load` of a hub metric fails
offline) built on the maintained library for its maths. `nll` needs the model itself (teacher-forced
likelihood of the reference): tasks/evaluate/predict.py computes it.

Imports nothing heavy at import time: tasks.gates.gate imports this module.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Metric:
    name: str                 # exact_match | token_f1 | rouge_l | chrf | json_match | nll
    higher_is_better: bool    # nll: False
    lo: float                 # range of one row's score
    hi: float
    binary: bool              # every row's score is 0 or 1 (exact_match only): McNemar applies
    kind: str                 # "generation" (scored on the generated answer) | "likelihood" (needs the model)
    doc: str                  # one line: what it measures


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("exact_match", True, 0.0, 1.0, True, "generation",
           "the answer equals the reference, forgiving only case, surrounding quotes/backticks/whitespace and a "
           "trailing period"),
    Metric("token_f1", True, 0.0, 1.0, False, "generation",
           "SQuAD-style word overlap: F1 of the answer's and the reference's words, lower-cased, without "
           "punctuation or articles, in any order"),
    Metric("rouge_l", True, 0.0, 1.0, False, "generation",
           "ROUGE-L F1 (rouge-score, stemmed): the longest common word subsequence of answer and reference, so "
           "word order counts"),
    Metric("chrf", True, 0.0, 1.0, False, "generation",
           "chrF (sacrebleu), scaled to 0..1: character n-gram F-score; forgives inflection and needs no word "
           "splitting (any script)"),
    Metric("json_match", True, 0.0, 1.0, False, "generation",
           "the answer is valid JSON and holds the reference JSON's fields: share of the reference's leaf fields "
           "with the same value (0 for invalid JSON)"),
    Metric("nll", False, 0.0, math.inf, False, "likelihood",
           "mean per-token negative log-likelihood of the reference answer and its turn end under teacher "
           "forcing (no generation; lower is better)"),
)}


def get(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; valid metrics: {', '.join(METRICS)}") from None


@functools.lru_cache(maxsize=None)
def _module(name: str):
    import evaluate  # heavy (datasets, pyarrow): only when something is scored

    return evaluate.load(str(HERE / name))


def score(name: str, predictions: list[str], references: list[str]) -> list[float]:
    """One score per row of a generation metric, in row order (ValueError for nll: it needs the model)."""
    m = get(name)
    if m.kind != "generation":
        raise ValueError(f"{name} is computed from the model's likelihoods, not from answers: tasks.evaluate.predict "
                         "computes it when it evaluates a model")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references: one each per row")
    if not predictions:
        return []
    res = _module(name).compute(predictions=list(predictions), references=list(references))
    return [float(x) for x in res["scores"]]


def normalize(s: str) -> str:
    """exact_match's normalisation (the report compares labels with it too)."""
    from qlora_ops.tasks.metrics.exact_match.exact_match import normalize as _n

    return _n(s)
