"""chrF per row (`sacrebleu`, its defaults: character 6-grams, beta 2), scaled to 0..1, as a local
`evaluate` module.

Local because `evaluate.load("chrf")` is a hub script (fails offline). Character n-gram F-score:
partial credit for inflections and compounds, and no word splitting, so it works for any script.
sacrebleu reports 0..100; divided by 100 here so every overlap metric shares the 0..1 scale.
Lower-cased (sacrebleu's `lowercase=True`), as every other text metric here: case alone never costs.
"""
import datasets
import evaluate
from sacrebleu.metrics import CHRF


class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description="predictions, references: lists of strings",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        chrf = CHRF(lowercase=True)
        scores = [chrf.sentence_score(p, [r]).score / 100 for p, r in zip(predictions, references)]
        return {"chrf": sum(scores) / max(len(scores), 1), "scores": scores}
