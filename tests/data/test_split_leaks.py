"""The split cannot leak (issue 25 "Leakage"): normalised key + near-duplicate clusters, the test-set
lineage pinning test rows, refused split-setting changes, the contamination count, corrections.

Fast: prepare() on a few hundred synthetic rows in tmp_path, no DVC, no model.
"""
from __future__ import annotations

import random

import pytest

from qlora_ops.tasks.core.config import SplitParams
from qlora_ops.tasks.data import lineage
from qlora_ops.tasks.data.dedupe import normalise
from qlora_ops.tasks.data.prepare import DataError, prepare
from tests.data.test_data import params_for, splits_of, write

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega red green blue yellow black white").split()


def rows(n: int, start: int = 0) -> list[dict]:
    """Distinct prompts of random words (no two near-duplicates), labels a/b."""
    out = []
    for i in range(start, start + n):
        rnd = random.Random(i)
        words = " ".join(rnd.choice(WORDS) for _ in range(12))
        out.append({"instruction": f"Is item {i} positive?", "input": f"Item {i}: {words}.", "output": "ab"[i % 2]})
    return out


def prompts(prep, split: str) -> set[str]:
    return {normalise(r["prompt"]) for r in splits_of(prep)[split].values()}


def test_normalise_folds_unicode_case_punctuation_and_space():
    assert normalise("Ｗhat  is\tX?") == normalise("what is x") == "what is x"


def test_a_recased_copy_without_punctuation_lands_in_the_same_split(tmp_path):
    base = rows(200)
    twins = [{**r, "instruction": r["instruction"].lower().rstrip("?"), "input": r["input"].lower()} for r in base]
    write(tmp_path / "raw.jsonl", base + twins)
    p = params_for(tmp_path)
    prepare(p, tmp_path)
    test, train = prompts(tmp_path / "prepared", "test"), prompts(tmp_path / "prepared", "train")
    assert test and not test & train  # the old whitespace-only key put near-twins of test rows in train


def test_test_rows_stay_in_test_when_data_is_added_removed_and_edited(tmp_path):
    p = params_for(tmp_path)
    write(tmp_path / "raw.jsonl", rows(300))
    prepare(p, tmp_path)
    old_test = prompts(tmp_path / "prepared", "test")
    old_train = prompts(tmp_path / "prepared", "train")
    # v2: 100 added, 20 removed, 40 prompts cosmetically edited (an extra word), 20 labels corrected
    v2 = rows(300)[20:] + rows(100, start=1000)
    for r in v2[:40]:
        r["input"] = r["input"].replace("Item", "The item")
    write(tmp_path / "raw.jsonl", v2)
    stats = prepare(p, tmp_path)
    new_test, new_train = prompts(tmp_path / "prepared", "test"), prompts(tmp_path / "prepared", "train")
    def original(xs):  # the edited prompts mapped back to the rows they were
        return {x.replace("the item ", "item ") for x in xs}
    # no row of the old test set, edited or not, is in the new train set; no old train row in new test
    assert not original(new_train) & old_test
    assert not original(new_test) & old_train
    assert stats["contamination"] == 0


@pytest.mark.parametrize("change", [{"split": SplitParams(seed=7)}, {"max_input_chars": 20},
                                    {"split": SplitParams(test=0.3)}])
def test_a_split_setting_change_is_refused_until_a_new_lineage(tmp_path, change):
    write(tmp_path / "raw.jsonl", rows(300))
    prepare(params_for(tmp_path), tmp_path)
    before = splits_of(tmp_path / "prepared")
    changed = params_for(tmp_path, **change)
    with pytest.raises(DataError, match=r"would move \d+ row\(s\).*new-lineage") as e:
        prepare(changed, tmp_path)
    key = {"split": "split.", "max_input_chars": "max_input_chars"}[next(iter(change))]
    assert key in str(e.value)
    assert splits_of(tmp_path / "prepared") == before  # nothing written
    lineage.new_lineage(lineage.lineage_path(tmp_path, changed), "test")
    write(tmp_path / "raw.jsonl", rows(300) + rows(150, start=2000))  # a new lineage wants fresh rows
    stats = prepare(changed, tmp_path)
    assert stats["lineage"] == 2 and stats["contamination"] == 0
    # rows the earlier lineage trained on never enter the new test set
    assert not prompts(tmp_path / "prepared", "test") & {normalise(r["prompt"]) for r in before["train"].values()}


def test_contamination_counts_test_rows_whose_cluster_was_trained_on(tmp_path):
    # T_k (test) and R_k (train) share 18 words but are not near-duplicates (Jaccard 0.62); a later row B_k
    # holding only the shared words is a near-duplicate of both (0.76) and joins their clusters.
    def text(k, head="", tail=""):
        return " ".join([head, *(f"w{k}x{i}" for i in range(18)), tail]).strip()
    pairs = [({"instruction": text(k, tail=" ".join(f"t{k}y{i}" for i in range(5))), "output": "a"},
              {"instruction": text(k, head=" ".join(f"r{k}y{i}" for i in range(5))), "output": "a"}) for k in range(60)]
    base = rows(200) + [r for pair in pairs for r in pair]
    write(tmp_path / "raw.jsonl", base)
    p = params_for(tmp_path)
    assert prepare(p, tmp_path)["contamination"] == 0
    got = splits_of(tmp_path / "prepared")
    where = {normalise(r["prompt"]): s for s, rs in got.items() for r in rs.values()}
    k = next(k for k, (t, r) in enumerate(pairs)
             if where[normalise(t["instruction"])] == "test" and where[normalise(r["instruction"])] == "train")
    write(tmp_path / "raw.jsonl", base + [{"instruction": text(k), "output": "a"}])
    stats = prepare(p, tmp_path)
    assert stats["contamination"] == 3  # T_k, B_k and R_k (trained on, now pulled into the pinned cluster)


def test_a_corrections_file_replaces_earlier_rows_by_prompt(tmp_path):
    base = rows(60)
    write(tmp_path / "raw" / "week1.jsonl", base)
    fixed = [{**base[3], "output": "b" if base[3]["output"] == "a" else "a"}]
    write(tmp_path / "raw" / "week2.corrections.jsonl", fixed)
    p = params_for(tmp_path)
    p = p.model_copy(update={"data": p.data.model_copy(update={"raw": str(tmp_path / "raw")})})
    stats = prepare(p, tmp_path)
    assert stats["corrections"] == {"rows": 1, "replaced": 1}
    every = {k: v for s in splits_of(tmp_path / "prepared").values() for k, v in s.items()}
    got = [r["completion"] for r in every.values() if "Item 3:" in r["prompt"]]
    assert got == [fixed[0]["output"]]
    # the same row in an ordinary file is still a conflict, named file:line
    write(tmp_path / "raw" / "week3.jsonl", fixed)
    (tmp_path / "raw" / "week2.corrections.jsonl").unlink()
    with pytest.raises(DataError, match=r"week1.jsonl:4 and .*week3.jsonl:1"):
        prepare(p, tmp_path)
