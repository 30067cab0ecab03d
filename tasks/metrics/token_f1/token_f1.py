"""SQuAD-style token F1, per row, as a local `evaluate` module.

The official SQuAD evaluation script's maths (Rajpurkar et al. 2016; v2.0 script for empty answers):
lower-case, drop punctuation and the articles a/an/the, split on whitespace, then F1 of the two bags
of words. Written out here because no maintained library installable offline exposes it per row
(`evaluate.load("squad")` is a hub script; transformers 5 dropped its squad_metrics): it is the
script's dozen lines, tested against hand-computed values.
"""
import collections
import re
import string

import datasets
import evaluate

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def f1(prediction: str, reference: str) -> float:
    p, r = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not p or not r:  # SQuAD v2.0: an empty answer is right only against an empty reference
        return float(p == r)
    same = sum((collections.Counter(p) & collections.Counter(r)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


class TokenF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description="predictions, references: lists of strings",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scores = [f1(p, r) for p, r in zip(predictions, references)]
        return {"token_f1": sum(scores) / max(len(scores), 1), "scores": scores}
