"""JSON field match per row (F1 over leaf fields), as a local `evaluate` module.

The answer must parse as JSON (the stdlib `json` parser, strict: no code fences, no trailing text);
then both values are flattened into their leaf fields, each named by its path: the tuple of object keys
and list positions from the root, so `{"a.b": 1}` and `{"a": {"b": 1}}` are different fields and a key
"0" is not list position 0. A reference field is matched when the answer holds the same value at the
same path. Row score = F1 of precision (matched / the answer's fields: extra fields cost) and recall
(matched / the reference's fields); invalid JSON scores 0. Values compare as JSON values: 1 == 1.0, but
true != 1 and "1" != 1. The flattening is the dozen lines below: no maintained library scores a partial
JSON match per field.
"""
import json

import datasets
import evaluate

_MISSING = object()


def leaves(x, path: tuple = ()) -> list[tuple[tuple, object]]:
    """(path, value) of every leaf of a parsed JSON value; an empty object/list is a leaf itself. A path is
    a tuple of keys (str) and list positions (int): unambiguous whatever the keys hold."""
    if isinstance(x, dict) and x:
        return [leaf for k, v in x.items() for leaf in leaves(v, (*path, str(k)))]
    if isinstance(x, list) and x:
        return [leaf for i, v in enumerate(x) for leaf in leaves(v, (*path, i))]
    return [(path, x)]


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):  # JSON true is not the number 1
        return type(a) is type(b) and a == b
    if isinstance(a, (dict, list)) or isinstance(b, (dict, list)):  # empty containers: same kind only
        return type(a) is type(b) and a == b
    return a == b


def field_score(prediction: str, reference: str, row: int = 0) -> float:
    try:
        ref = json.loads(reference)
    except ValueError:
        raise ValueError(f"json_match: reference of row {row} is not valid JSON ({reference[:60]!r}); every "
                         "reference answer must be JSON for this metric (or choose another eval.metric)") from None
    try:
        pred = json.loads(prediction)
    except ValueError:
        return 0.0
    got = dict(leaves(pred))
    want = leaves(ref)
    matched = sum(_same(got.get(p, _MISSING), v) for p, v in want)
    if matched == 0:
        return 0.0
    precision, recall = matched / len(got), matched / len(want)
    return 2 * precision * recall / (precision + recall)


class JsonMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description="predictions, references: lists of strings",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scores = [field_score(p, r, i) for i, (p, r) in enumerate(zip(predictions, references))]
        return {"json_match": sum(scores) / max(len(scores), 1), "scores": scores}
