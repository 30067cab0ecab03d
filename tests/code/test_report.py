"""The pure parts of the run report: label-task detection, confusion matrix + per-class accuracy from
rows, worst-first ordering of the side-by-side rows, the stage table's optional memory column, the card."""
from __future__ import annotations

import pytest

from qlora_ops.tasks.report.card import CARD_LIMIT, model_card
from qlora_ops.tasks.report.frames import confusion, macro_f1, recall_vs_champion, stage_table, worst_first
from qlora_ops.tasks.report.gather import is_label_task, label_set


def test_confusion_and_per_class_from_rows():
    refs = ["json", "os", "os", "re", "json", "os"]
    preds = ["json", "os", "Re.", "re", "The module is json.", "`OS`"]  # normalized like the metric; rambling = other
    cm, per = confusion(refs, preds, None)
    assert list(cm.index) == ["json", "os", "re"] and list(cm.columns) == ["json", "os", "re", "(other)"]
    assert cm.loc["os", "os"] == 2 and cm.loc["os", "re"] == 1 and cm.loc["json", "(other)"] == 1
    assert int(cm.to_numpy().sum()) == len(refs)
    got = {r.label: (r.n, r.correct, r.recall, r.precision, r.f1) for r in per.itertuples()}
    assert got == {"json": (2, 1, 0.5, 1.0, 0.6667), "os": (3, 2, 0.6667, 1.0, 0.8), "re": (1, 1, 1.0, 0.5, 0.6667)}
    # macro-F1: each class weighs the same (accuracy 4/6 is dominated by the frequent classes)
    assert macro_f1(per) == pytest.approx((0.6667 + 0.8 + 0.6667) / 3, abs=1e-4)
    from sklearn.metrics import f1_score

    norm = {"json": "json", "os": "os", "Re.": "re", "re": "re", "The module is json.": "(other)", "`OS`": "os"}
    assert macro_f1(per) == pytest.approx(f1_score(refs, [norm[p] for p in preds], labels=["json", "os", "re"],
                                                   average="macro"), abs=1e-4)


def test_per_class_recall_against_the_champion_on_the_same_rows():
    """Accuracy rose (4/6 vs 3/6) while class `re` lost every row it had: per class, the change shows it."""
    refs = ["json", "json", "os", "os", "re", "re"]
    per = recall_vs_champion(refs, [True, True, True, True, False, False], [False, False, True, False, True, True])
    got = {r.label: (r.n, r.candidate, r.champion, r.change) for r in per.itertuples()}
    assert got == {"json": (2, 1.0, 0.0, 1.0), "os": (2, 1.0, 0.5, 0.5), "re": (2, 0.0, 1.0, -1.0)}
    with pytest.raises(ValueError, match="not the same rows"):
        recall_vs_champion(refs, [True] * 6, [True] * 5)


def test_confusion_keeps_declared_labels_without_rows():
    cm, per = confusion(["a", "a"], ["a", "b"], ["a", "b", "c"])
    assert list(cm.index) == ["a", "b", "c"] and cm.loc["a", "b"] == 1
    assert per.set_index("label").loc["c", "n"] == 0


def test_worst_first_puts_regressions_then_tuned_errors_first():
    rows = [{"id": i, "base_correct": b, "tuned_correct": t}
            for i, (b, t) in enumerate([(True, True), (False, True), (False, False), (True, False), (False, False),
                                        (True, False)])]
    assert [r["id"] for r in worst_first(rows)] == [3, 5, 2, 4, 1, 0]


def test_label_task_detection():
    assert is_label_task(["a", "b", "a", "b", "a"])
    assert not is_label_task([f"free text answer {i}" for i in range(10)])
    assert is_label_task(["x"], ["x", "y"])  # data.labels decides
    assert label_set(None, {"json": 5, "os": 3}) == ["json", "os"]
    assert label_set(None, {"one answer": 1, "another": 1}) is None  # never repeated: free text
    assert label_set(["b", "a"], None) == ["b", "a"]


def test_stage_table_shows_peak_memory_only_when_recorded():
    secs = {"ms.train_qlora": 9.0, "model_stage": 10.0, "prepare": 1.0, "total": 11.0}  # sorted, as summary.json
    assert list(stage_table(secs).columns) == ["stage", "seconds"]
    assert list(stage_table(secs)["stage"]) == ["prepare", "model_stage", "ms.train_qlora", "total"]
    t = stage_table(secs, {"train_qlora": 812.5})
    assert list(t["peak MiB"].fillna(-1)) == [-1, -1, 812.5, -1]


def test_model_card_has_the_facts_and_fits_the_description_column():
    m = {"accuracy": 0.6, "ci_low": 0.5, "ci_high": 0.7, "eos_rate": 1.0, "n": 107}
    gates = [{"name": "gain_over_base", "value": 0.6, "op": ">=", "threshold": 0.2, "passed": True, "detail": "",
              "ci_low": 0.5, "ci_high": 0.69, "ci_of": "value", "decided_on": "interval lower bound"}]
    summary = {"mlflow_run_id": "r1", "models": {"base": {**m, "accuracy": 0.0}, "qlora": m, "merged": m},
               "gates": gates, "power": "test set has 107 rows: ...", "fingerprint": "fp",
               "code": {"git_commit": "abc", "source_sha": "s"},
               "data": {"version": "dv1", "stage": "prepare", "stats": {"train": 318, "val": 55, "test": 107}}}
    card = model_card(summary, {"model.source": "smollm2-gguf", "registry.model_name": "m"},
                      [f"label{i}" for i in range(2000)], {"version": 3, "promoted": False, "reason": "no gain"})
    assert card.startswith("# m v3") and "smollm2-gguf" in card and "dv1" in card and "318/55/107" in card
    assert "[0.500, 0.700]" in card and "gain_over_base" in card and "Not promoted: no gain" in card
    assert "Test set: 107 rows; the policy" not in card and "Test set: 107 rows; ..." in card
    assert "runs:/r1/report/report.html" in card
    assert len(card) <= CARD_LIMIT and "(+1970 more)" in card
    # summary.json is logged with sorted keys: the card read back from MLflow must be the same text
    resorted = {**summary, "models": dict(sorted(summary["models"].items()))}
    assert model_card(resorted, {"model.source": "smollm2-gguf", "registry.model_name": "m"},
                      [f"label{i}" for i in range(2000)], {"version": 3, "promoted": False,
                                                           "reason": "no gain"}) == card
    assert card.index("| base") < card.index("| qlora") < card.index("| merged")
