"""tasks.metrics: every metric against hand-computed values AND against the library (or script) it is
built on, per row. Fast: no model (nll's model side is tests/model/test_eval_metrics.py)."""
from __future__ import annotations

import collections
import math
import re
import string
import subprocess
import sys
import typing

import pytest

from qlora_ops.tasks import metrics as M
from qlora_ops.tasks.core.config import MetricName

PAIRS = [("Read the whole file.", "Read the file."), ("Return a list of names", "Return the list of all names."),
         ("open a connection to the server", "Open the server connection."), ("", "Close the socket."),
         ("Parse a query string given as a string argument.", "Parse a query given as a string argument."),
         ("completely unrelated words here", "Set the event loop."), ("Wait for the Future.", "Wait for the Future."),
         ("Décodez les données", "Decode the data.")]


def test_declared_directions_ranges_and_kinds():
    assert set(M.METRICS) == set(typing.get_args(MetricName))  # params accept exactly the metrics that exist
    assert [n for n, m in M.METRICS.items() if m.binary] == ["exact_match"]
    nll = M.get("nll")
    assert (nll.higher_is_better, nll.lo, nll.hi, nll.kind) == (False, 0.0, math.inf, "likelihood")
    for n in ("exact_match", "token_f1", "rouge_l", "chrf", "json_match"):
        m = M.get(n)
        assert (m.higher_is_better, m.lo, m.hi, m.kind) == (True, 0.0, 1.0, "generation") and m.doc
    with pytest.raises(ValueError, match="exact_match, token_f1, rouge_l, chrf, json_match, nll"):
        M.get("bleu")
    with pytest.raises(ValueError, match="likelihood|model"):
        M.score("nll", ["a"], ["b"])
    with pytest.raises(ValueError, match="one each per row"):
        M.score("rouge_l", ["a", "b"], ["b"])


def test_importing_metrics_is_light():
    code = "import sys, tasks.metrics; bad = {'evaluate', 'torch', 'datasets', 'rouge_score', 'sacrebleu'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_exact_match_keeps_the_label_normalisation():
    got = M.score("exact_match", ["JSON.", "The module is os", "`re`", " 'Math' ", "json"], ["json", "os", "re", "math", "os"])
    assert got == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert M.normalize(" 'Email.' ") == "email" and M.normalize("`Email`.") == "email`"  # today's rule, kept as is


def _squad_f1(prediction: str, ground_truth: str) -> float:
    """The official SQuAD v1.1 evaluation script's normalize_answer + f1_score, verbatim in substance."""
    def normalize_answer(s):
        def remove_articles(text):
            return re.sub(r"\b(a|an|the)\b", " ", text)

        def white_space_fix(text):
            return " ".join(text.split())

        def remove_punc(text):
            exclude = set(string.punctuation)
            return "".join(ch for ch in text if ch not in exclude)
        return white_space_fix(remove_articles(remove_punc(s.lower())))

    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def test_token_f1_hand_computed_and_squad_script():
    # "cat sat on mat" vs "cat sat": 2 shared, P 2/4, R 2/2 -> F1 2/3; bag of words: order does not count
    got = M.score("token_f1", ["The cat sat on the mat.", "bed the under was cat the", "", "An apple"],
                  ["A cat sat.", "the cat was under the bed", "x", "the"])
    assert got == pytest.approx([2 / 3, 1.0, 0.0, 0.0])
    assert M.score("token_f1", ["the"], ["a"]) == [1.0]  # both empty after normalising: SQuAD v2.0 rule
    preds, refs = zip(*[(p, r) for p, r in PAIRS if p])  # v1.1 script and ours differ only on empty answers
    assert M.score("token_f1", list(preds), list(refs)) == pytest.approx([_squad_f1(p, r) for p, r in zip(preds, refs)])


def test_rouge_l_hand_computed_and_rouge_score():
    from rouge_score import rouge_scorer

    # LCS "the cat was under the bed" (6 of 7 predicted words): P 6/7, R 1 -> F 12/13. Reversed order: LCS 3 -> 0.5
    got = M.score("rouge_l", ["the cat was found under the bed", "bed the under was cat the", "Reading files"],
                  ["the cat was under the bed", "the cat was under the bed", "Read a file"])
    assert got == pytest.approx([12 / 13, 0.5, 0.8])  # stemmed: read~reading, file~files: LCS 2, P 2/2, R 2/3
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    ascii_pairs = [(p, r) for p, r in PAIRS if (p + r).isascii()]  # rouge-score's own tokenizer: ASCII only
    preds, refs = zip(*ascii_pairs)
    assert M.score("rouge_l", list(preds), list(refs)) == [scorer.score(r, p)["rougeL"].fmeasure for p, r in ascii_pairs]


def test_rouge_l_keeps_the_words_of_every_script():
    """rouge-score's tokenizer keeps only [a-z0-9]: two different Cyrillic answers sharing "42" scored 1.0,
    identical Cyrillic answers 0.0, `x = a - b` vs `x = a + b` 1.0 (issue 26)."""
    got = M.score("rouge_l", ["Ответ 42", "Привет мир", "東京は日本の首都です", "Décodez les données"],
                  ["Другое 42", "Привет мир", "日本の首都は東京です", "Décodez les données"])
    assert got[0] == pytest.approx(0.5) and got[1:] == [1.0, pytest.approx(0.7), 1.0]  # kana/Han: one word per character


def test_chrf_hand_computed_and_sacrebleu():
    import sacrebleu

    assert M.score("chrf", ["Close the socket.", "xyz"], ["Close the socket.", "abc"]) == pytest.approx([1.0, 0.0])
    # "ab" vs "abc": char 1-grams P 2/2 R 2/3, 2-grams P 1/1 R 1/2; the answer has no 3..6-grams, so sacrebleu
    # averages over orders 1-2 only (effective order): P 1, R 7/12, then the beta=2 F-score 5PR/(4P+R) = 7/11.
    p, r = 1.0, (2 / 3 + 1 / 2) / 2
    assert M.score("chrf", ["ab"], ["abc"]) == pytest.approx([5 * p * r / (4 * p + r)])
    preds, refs = zip(*PAIRS)
    chrf = sacrebleu.metrics.CHRF(lowercase=True)  # lower-cased like every other text metric
    assert M.score("chrf", list(preds), list(refs)) == pytest.approx(
        [chrf.sentence_score(p, [r]).score / 100 for p, r in PAIRS])
    assert M.score("chrf", ["CLOSE THE SOCKET."], ["Close the socket."]) == [1.0]  # was 0.23: case-sensitive


def test_json_match_field_by_field():
    ref = '{"name": "Ann", "age": 30, "tags": ["a", "b"], "address": {"city": "Oslo"}}'  # 5 leaf fields
    got = M.score("json_match", [
        '{"name": "Ann", "age": 30.0, "tags": ["a", "b"], "address": {"city": "Oslo"}, "extra": 1}',  # all + extra
        '{"name": "Ann", "age": "30", "tags": ["a", "c"], "address": {"city": "Oslo"}}',  # "30" != 30, b != c
        '{"name": "Ann"}',
        '```json\n{"name": "Ann"}\n```',  # not JSON: 0
        '{"name": "Ann",}',  # not JSON
        '[1, 2]',
    ], [ref] * 6)
    # F1 of precision (matched / the answer's fields) and recall (matched / the reference's 5 fields)
    assert got == pytest.approx([2 * 5 / 6 / (5 / 6 + 1), 3 / 5, 2 * 1 / 5 / (1 + 1 / 5), 0.0, 0.0, 0.0])
    assert M.score("json_match", ['{"ok": 1}', '{"ok": true}', "5.0", "[]"],
                   ['{"ok": true}', '{"ok": true}', "5", "[]"]) == [0.0, 1.0, 1.0, 1.0]  # true is not 1
    with pytest.raises(ValueError, match="reference of row 1 is not valid JSON"):
        M.score("json_match", ["{}", "{}"], ['{"a": 1}', "not json"])


def test_json_match_counts_extra_fields_and_keeps_paths_apart():
    """Recall-only scored [1,2,3,4,5] vs [1] as 1.0, and the dotted paths made {"a.b":1} equal {"a":{"b":1}}."""
    assert M.score("json_match", ["[1, 2, 3, 4, 5]", '{"a.b": 1}', '{"0": 1}', '{"a": {}}'],
                   ["[1]", '{"a": {"b": 1}}', "[1]", '{"a": []}']) == pytest.approx([1 / 3, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("name", [n for n, m in M.METRICS.items() if m.kind == "generation" and n != "json_match"])
def test_every_metric_scores_the_best_of_several_references_and_empty_text_alike(name):
    """A row's references may be a list: its best match counts (lm-eval's ["United States", "USA", "US"]);
    empty vs empty is 1 and empty vs text 0 for every metric (rouge_l and chrF said 0 for empty vs empty)."""
    refs = [["United States", "USA", "US"], "", "", "Close the socket."]
    got = M.score(name, ["USA", "", "   ", ""], refs)
    assert got == [1.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="empty list of references"):
        M.score(name, ["x"], [[]])


def test_json_match_best_of_references_and_empty_answer():
    assert M.score("json_match", ['{"a": 2}', ""], [['{"a": 1}', '{"a": 2}'], '{"a": 1}']) == [1.0, 0.0]


def test_harness_metrics_are_gate_metrics():
    m = M.get("lm_eval.acc_norm")
    assert (m.binary, m.higher_is_better, m.kind, m.lo, m.hi) == (True, True, "harness", 0.0, 1.0)
    with pytest.raises(ValueError, match="lm_eval.acc_norm"):
        M.get("lm_eval.bleu")
