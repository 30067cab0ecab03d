"""Label accuracy: exact match after light normalization, as a local `evaluate` module.

Local because `evaluate.load("accuracy")` reaches for the hub and fails offline. Normalization only
forgives case, surrounding whitespace/quotes/backticks and a trailing period, so a model that
rambles ("The module is json.") scores 0: the task asks for the exact label.
"""
import datasets
import evaluate


def normalize(s: str) -> str:
    return s.strip().strip("`'\" ").rstrip(".").strip().lower()


class LabelAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions, references: lists of strings",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        hits = [normalize(p) == normalize(r) for p, r in zip(predictions, references)]
        # Per-row hits too: every paired comparison (gates, promotion) is made on the same rows.
        return {"accuracy": sum(hits) / max(len(hits), 1), "correct": sum(hits), "n": len(hits), "hits": hits}
