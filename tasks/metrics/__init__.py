"""The metrics a test split can be scored with: what each measures, its direction and range, per-row scores.

    from qlora_ops.tasks import metrics
    metrics.get("rouge_l").higher_is_better              # True
    metrics.score("rouge_l", ["Read a file."], ["Read the file."])   # [0.857...] one score per row

Every metric scores each row on its own, so every comparison (gates, promotion) stays paired on the
same rows. A row may have several acceptable references (a list): it scores its best match. One
convention for empty text, every metric: an empty answer (whitespace only) scores 1 against an empty
reference and 0 against any other, and a non-empty answer scores 0 against an empty reference. Generation metrics score the generated answer against the reference; each is a local
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
    #                           | "harness" (an lm-eval suite's own per-sample metric, lm_eval.<name>)
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
           "word order counts; words of any script (a Han or kana character is a word)"),
    Metric("chrf", True, 0.0, 1.0, False, "generation",
           "chrF (sacrebleu, lower-cased), scaled to 0..1: character n-gram F-score; forgives inflection and needs "
           "no word splitting (any script)"),
    Metric("json_match", True, 0.0, 1.0, False, "generation",
           "the answer is valid JSON with the reference JSON's fields: F1 over leaf fields (by their full key path) "
           "of the answer's fields that match (precision) and the reference's fields it holds (recall); 0 for "
           "invalid JSON"),
    Metric("nll", False, 0.0, math.inf, False, "likelihood",
           "negative log-likelihood per token of the reference answer and its turn end under teacher forcing "
           "(no generation; lower is better): per row its own, reported as total nats over total tokens, with "
           "bits per byte beside it (nll_totals) for bases with other tokenizers"),
)}


@functools.lru_cache(maxsize=None)
def _module(name: str):
    import evaluate  # heavy (datasets, pyarrow): only when something is scored

    return evaluate.load(str(HERE / name))


def get(name: str) -> Metric:
    """A metric by name; `lm_eval.<name>` is an lm-eval harness's own per-sample metric (see HARNESS)."""
    if name.startswith("lm_eval."):
        return harness(name)
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; valid metrics: {', '.join(METRICS)} or lm_eval.<harness "
                         f"metric> ({', '.join(HARNESS)})") from None


# lm-eval's own per-sample metrics a suite may be gated on (`metric: lm_eval.acc_norm`): the harness computes
# them per document (tasks.evaluate.lm_eval_suite keeps them as `lm_eval.<name>` scores beside ours), all
# 0/1 per row and higher-is-better, so the paired statistics treat them like exact match.
HARNESS = {"acc": "the choice the model ranks first is the gold one (lm-eval's acc)",
           "acc_norm": "the choice ranked first by length-normalised log-likelihood is the gold one (lm-eval's acc_norm)",
           "exact_match": "the harness's exact match of the filtered answer (its filter) and the target",
           "acc_mutual_info": "the choice ranked first by mutual information is the gold one (lm-eval's acc_mutual_info)"}


def harness(name: str) -> Metric:
    short = name.removeprefix("lm_eval.")
    if short not in HARNESS:
        raise ValueError(f"unknown harness metric {name!r}; an lm-eval suite may be gated on "
                         f"{', '.join('lm_eval.' + h for h in HARNESS)}")
    return Metric(name, True, 0.0, 1.0, True, "harness", HARNESS[short])


def _empty(prediction: str, reference: str) -> float | None:
    """The empty-text convention (module docstring), or None when neither side is empty."""
    p, r = not prediction.strip(), not reference.strip()
    return float(p and r) if p or r else None


def score(name: str, predictions: list[str], references: list[str | list[str]]) -> list[float]:
    """One score per row of a generation metric, in row order (ValueError for nll: it needs the model). A
    reference may be a list of acceptable references: the row scores its best match."""
    m = get(name)
    if m.kind != "generation":
        raise ValueError(f"{name} is computed from the model's likelihoods, not from answers: tasks.evaluate.predict "
                         "computes it when it evaluates a model")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references: one each per row")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if empty := [i for i, r in enumerate(refs) if not r]:
        raise ValueError(f"row {empty[0]} has an empty list of references: give each row at least one")
    if not predictions:
        return []
    # Every (answer, reference) pair in one call, then the best per row.
    flat_p = [p for p, rs in zip(predictions, refs) for _ in rs]
    flat_r = [r for rs in refs for r in rs]
    flat = _module(name).compute(predictions=flat_p, references=flat_r)["scores"]
    out, i = [], 0
    for p, rs in zip(predictions, refs):
        pair = [_empty(p, r) for r in rs]
        out.append(max(float(s) if e is None else e for e, s in zip(pair, flat[i:i + len(rs)])))
        i += len(rs)
    return out


def normalize(s: str) -> str:
    """exact_match's normalisation (the report compares labels with it too)."""
    from qlora_ops.tasks.metrics.exact_match.exact_match import normalize as _n

    return _n(s)
