"""ROUGE-L F1 per row (Google's `rouge-score`, Porter-stemmed), as a local `evaluate` module.

Local because `evaluate.load("rouge")` is a hub script (fails offline) and returns only corpus
aggregates. The longest common subsequence of the answer's and the reference's words: the words must
come in the same order, not necessarily adjacent. Stemmed, so "reads"/"read" match. rouge-score's
tokenizer keeps only [a-z0-9] words: text in other scripts scores 0 (use chrf there).
"""
import datasets
import evaluate
from rouge_score import rouge_scorer


class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description="predictions, references: lists of strings",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]  # (target, prediction)
        return {"rouge_l": sum(scores) / max(len(scores), 1), "scores": scores}
