"""tasks/data/diff.py on small hand-made prepared dirs: exact counts, label and length shifts, the lines, the
remembered versions, and the model card's Data changes section."""
from __future__ import annotations

import json
from pathlib import Path

from qlora_ops.tasks.data.diff import diff_rows, format_diff, previous, remember


def prompt(i: int, extra: int = 0) -> str:
    # every row its own words: no two rows are near-duplicates unless a test makes them so
    return " ".join(f"w{i}x{j}" for j in range(6 + extra))


def row(i: int, label: str, text: str | None = None) -> dict:
    return {"id": f"r{i}", "system": "sys", "prompt": text or prompt(i), "completion": label}


def write(d: Path, **splits: list[dict]) -> Path:
    d.mkdir(parents=True)
    for s in ("train", "val", "test"):
        (d / f"{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in splits.get(s, [])))
    return d


def test_added_removed_and_edited_rows_are_counted_exactly(tmp_path):
    old_train = [row(i, "ab"[i % 2]) for i in range(20)]
    old_test = [row(100 + i, "ab"[i % 2]) for i in range(6)]
    new_train = ([row(0, "b")]  # same prompt, other label: an answer change
                 + [row(1, "b", prompt(1).upper().replace("X", "x") + " !!")]  # recased + punctuation: a text edit
                 + [row(i, "ab"[i % 2]) for i in range(3, 20)]  # row 2 removed
                 + [row(200 + i, "a") for i in range(3)])  # three new rows
    new_test = old_test[:5] + [row(105, "b", "   " + prompt(105) + "  ")]  # whitespace only: the same prompt
    d = diff_rows(write(tmp_path / "old", train=old_train, test=old_test),
                  write(tmp_path / "new", train=new_train, test=new_test), threshold=0.7)
    assert d["rows"] == {"old": 26, "new": 28}
    assert d["all"] == {"added": 3, "removed": 1, "answer_changed": 1, "text_edited": 1, "unchanged": 23}
    assert d["splits"]["train"] == {"added": 3, "removed": 1, "answer_changed": 1, "text_edited": 1, "unchanged": 17}
    assert d["splits"]["test"] == {"added": 0, "removed": 0, "answer_changed": 0, "text_edited": 0, "unchanged": 6}
    assert d["near_duplicate_rows"] == 0
    json.dumps(d)  # JSON-able: it is logged as the run's data card

    # a row moved from train to test: per split removed + added, over all splits unchanged
    moved = diff_rows(tmp_path / "old", write(tmp_path / "moved", train=old_train[1:], test=old_test + old_train[:1]), 0.7)
    assert moved["all"]["unchanged"] == 26 and moved["all"]["added"] == moved["all"]["removed"] == 0
    assert moved["splits"]["train"]["removed"] == 1 and moved["splits"]["test"]["added"] == 1


def test_near_duplicates_in_the_new_data_are_counted(tmp_path):
    old = write(tmp_path / "old", train=[row(i, "a") for i in range(10)])
    dup = [row(50, "a", prompt(3) + "."), row(51, "a", prompt(4).upper())]
    d = diff_rows(old, write(tmp_path / "new", train=[row(i, "a") for i in range(10)] + dup), 0.7)
    assert d["near_duplicate_rows"] == 4  # rows 3 and 4 and their two copies
    assert d["all"]["added"] == 2 and d["all"]["text_edited"] == 0  # the old rows are still there: not edits


def test_a_label_shift_is_detected_and_no_shift_is_not(tmp_path):
    old = write(tmp_path / "old", train=[row(i, "ab"[i % 2]) for i in range(100)])
    same = diff_rows(old, old, 0.7)["labels"]
    assert same["bins"] == ["a", "b"] and same["psi"] < 1e-9 and same["p_value"] > 0.9 and not same["shift"]
    skewed = write(tmp_path / "new", train=[row(i, "a" if i < 90 else "b") for i in range(100)])
    lb = diff_rows(old, skewed, 0.7)["labels"]
    assert lb["old"] == {"a": 50, "b": 50} and lb["new"] == {"a": 90, "b": 10}
    assert lb["p_value"] < 1e-6 and lb["psi"] > 0.1 and lb["shift"]
    # a label that vanished: PSI stays finite (epsilon for the empty bin)
    gone = diff_rows(old, write(tmp_path / "gone", train=[row(i, "a") for i in range(100)]), 0.7)["labels"]
    assert gone["new"]["b"] == 0 and 1 < gone["psi"] < 100


def test_free_text_has_no_label_section(tmp_path):
    d = diff_rows(write(tmp_path / "o", train=[row(i, f"answer {i}") for i in range(30)]),
                  write(tmp_path / "n", train=[row(i, f"answer {i}!") for i in range(30)]), 0.7)
    assert d["labels"] is None and d["all"]["answer_changed"] == 30


def test_a_length_shift(tmp_path):
    old = write(tmp_path / "old", train=[row(i, "a") for i in range(40)])
    new = write(tmp_path / "new", train=[row(i, "a", prompt(i, extra=12)) for i in range(40)])
    ln = diff_rows(old, new, 0.7)["length"]
    assert ln["new_mean"] > 2 * ln["old_mean"] and ln["new_median"] > ln["old_median"]
    assert ln["ks"] == 1.0 and ln["ks_p"] < 1e-6
    assert diff_rows(old, old, 0.7)["length"]["ks"] == 0.0


def test_format_lines(tmp_path):
    old = write(tmp_path / "old", train=[row(i, "ab"[i % 2]) for i in range(100)])
    new = write(tmp_path / "new", train=[row(i, "a" if i < 90 else "b") for i in range(100)] + [row(500, "a")])
    lines = format_diff(diff_rows(old, new, 0.7))
    assert lines[0] == ("rows 100 -> 101: +1 added, -0 removed, 50 answers changed, 0 text edits (near-duplicate), "
                        "50 unchanged")
    assert lines[1].startswith("  per split (added/removed/answers/text edits): train +1/-0/50/0, val +0/-0/0/0")
    assert "PSI" in lines[2] and "(shifted)" in lines[2] and "a 50->91" in lines[2] and "chi-square p=" in lines[2]
    assert lines[3].startswith("  prompt chars: mean ") and "KS " in lines[3]
    assert lines[4] == "  near-duplicate rows in the new data: 0 (threshold 0.7)"


def test_remembered_versions_give_the_previous_one_and_keep_three(tmp_path):
    store = tmp_path / "store"
    dirs = [write(tmp_path / f"p{i}", train=[row(j, "a") for j in range(i + 1)]) for i in range(5)]
    assert previous(store, "v0") is None  # the first data version
    remember(store, "v0", dirs[0])
    assert previous(store, "v0") is None and previous(store, "v1") == store / "v0"
    for i in range(1, 5):
        remember(store, f"v{i}", dirs[i])
    assert sorted(p.name for p in store.iterdir() if p.is_dir()) == ["v2", "v3", "v4"]
    assert previous(store, "v4") == store / "v3"
    # the copy diffs as the prepared dir it was made from
    assert diff_rows(store / "v3", dirs[4], 0.7)["all"]["added"] == 1
    assert diff_rows(store / "v4", dirs[4], 0.7)["all"]["unchanged"] == 5
    remember(store, "v2", dirs[2])  # data restored to an earlier version: it becomes the newest
    assert previous(store, "v9") == store / "v2" and previous(store, "v2") == store / "v4"


def test_the_model_card_has_a_short_data_changes_section(tmp_path):
    from qlora_ops.tasks.report.card import model_card

    old = write(tmp_path / "old", train=[row(i, "ab"[i % 2]) for i in range(20)])
    new = write(tmp_path / "new", train=[row(i, "ab"[i % 2]) for i in range(25)])
    m = {"accuracy": 0.5, "eos_rate": 1.0, "n": 4}
    summary = {"mlflow_run_id": "r1", "models": {"base": m, "qlora": m, "merged": m}, "gates": [], "fingerprint": "fp",
               "code": {"git_commit": "abc", "source_sha": "s"},
               "data": {"version": "v2", "stage": "prepare", "stats": {},
                        "diff": {"version": "v2", "previous": "v1", **diff_rows(old, new, 0.7)}}}
    card = model_card(summary, {"registry.model_name": "m"}, ["a", "b"], {"version": 2, "promoted": True, "reason": "ok"})
    section = card[card.index("## Data changes"):card.index("## Promotion")].splitlines()
    assert section[2] == ("- data version v2 vs v1: rows 20 -> 25: +5 added, -0 removed, 0 answers changed, "
                          "0 text edits (near-duplicate), 20 unchanged")
    assert len(section) == 2 + 4 + 1 and section[4].startswith("- labels (2 bins, one per label): ")
    summary["data"]["diff"] = {"version": "v1", "first": True}
    card = model_card(summary, {"registry.model_name": "m"}, ["a", "b"], {"version": 1, "promoted": True, "reason": "ok"})
    assert "## Data changes\n\n- first data version (v1): nothing to compare with\n" in card
    del summary["data"]["diff"]  # a run recorded before data cards
    assert "## Data changes" not in model_card(summary, {}, None, {"version": 1, "promoted": True, "reason": "ok"})
