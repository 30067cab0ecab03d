"""ROUGE-L F1 per row (Google's `rouge-score`, Porter-stemmed), as a local `evaluate` module.

Local because `evaluate.load("rouge")` is a hub script (fails offline) and returns only corpus
aggregates. The longest common subsequence of the answer's and the reference's words: the words must
come in the same order, not necessarily adjacent. Stemmed, so "reads"/"read" match.

rouge-score's own tokenizer keeps only [a-z0-9] words, so Cyrillic or Greek text scored 0 (or matched
on a shared digit alone). `UnicodeTokenizer` (rouge-score's documented custom-tokenizer hook) keeps every
script's letters, marks and digits: on ASCII text it yields exactly rouge-score's tokens (lower-cased
[a-z0-9] runs, Porter-stemmed when longer than 3), so English scores are unchanged; a Han or kana
character is a word of its own (those scripts put no spaces between words); non-ASCII words are not
stemmed (the Porter stemmer is English-only).
"""
import datasets
import evaluate
import regex
from nltk.stem import porter
from rouge_score import rouge_scorer, tokenizers

_SPACELESS = regex.compile(r"([\p{Han}\p{Hiragana}\p{Katakana}])")
_WORD = regex.compile(r"[\p{L}\p{M}\p{N}]+")


class UnicodeTokenizer(tokenizers.Tokenizer):
    def __init__(self):
        self._stemmer = porter.PorterStemmer()

    def tokenize(self, text):
        words = _WORD.findall(_SPACELESS.sub(r" \1 ", text.lower()))
        return [self._stemmer.stem(w) if len(w) > 3 and w.isascii() else w for w in words]


class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description="predictions, references: lists of strings",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeTokenizer())
        scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]  # (target, prediction)
        return {"rouge_l": sum(scores) / max(len(scores), 1), "scores": scores}
