"""Gates on paired per-row scores: each planted candidate is refused by the right gate, with its interval, for
0/1 (exact match) and continuous (rouge_l, nll) metrics, and the extra suites' gain / non_inferior gates."""
from __future__ import annotations

import numpy as np
import pytest

from qlora_ops.tasks.gates import gate
from qlora_ops.tasks.core.config import GateParams
from qlora_ops.tasks.metrics import get

G = GateParams(min_gain_over_base=0.2, min_retention_vs_lora=0.9, max_merge_disagreement=0.05)
N = 200
EM = get("exact_match")


def rows(acc: float, shift: int = 0) -> list[bool]:
    """acc*N right answers; `shift` rotates which rows, so two vectors can share accuracy yet differ per row."""
    k = round(acc * N)
    v = [i < k for i in range(N)]
    return v[shift:] + v[:shift]


def by_name(vs):
    return {v["name"]: v for v in vs}


def test_good_candidate_passes_with_intervals():
    vs = by_name(gate.pre_merge_gates(G, EM, base=rows(0.05), lora=rows(0.70), qlora=rows(0.68)))
    assert gate.passed(list(vs.values()))
    g = vs["gain_over_base"]
    assert g["ci_low"] < g["value"] < g["ci_high"] and g["decided_on"] == "test and interval lower bound"
    assert "95% CI" in g["detail"] and "McNemar" in g["detail"]
    assert (g["metric"], g["suite"], g["confidence"]) == ("exact_match", None, 0.95)
    # Retention is the share of LoRA's gain over the base that QLoRA keeps: (0.68 - 0.05) / (0.70 - 0.05).
    assert vs["retention_vs_lora"]["value"] == pytest.approx(0.63 / 0.65, abs=1e-6)


def test_worse_than_base_is_refused_by_gain_gate():
    vs = by_name(gate.pre_merge_gates(G, EM, base=rows(0.30), lora=rows(0.30), qlora=rows(0.25)))
    assert not vs["gain_over_base"]["passed"] and vs["retention_vs_lora"]["passed"] is False
    assert "gain_over_base" in gate.explain(list(vs.values()))


def test_point_gain_above_threshold_but_interval_below_is_refused():
    # 0.22 point gain over base on 200 rows: the lower bound is far below 0.2, so the gate refuses.
    vs = by_name(gate.pre_merge_gates(G, EM, base=rows(0.40), lora=rows(0.62), qlora=rows(0.62, shift=30)))
    assert vs["gain_over_base"]["value"] >= 0.2 and not vs["gain_over_base"]["passed"]


def test_below_retention_bar_is_refused_by_retention_gate():
    vs = by_name(gate.pre_merge_gates(G, EM, base=rows(0.0), lora=rows(0.80), qlora=rows(0.60)))
    assert vs["gain_over_base"]["passed"] and not vs["retention_vs_lora"]["passed"]
    assert vs["retention_vs_lora"]["value"] == 0.75


def test_retention_is_of_the_gain_over_the_base():
    """base 0.20, LoRA 0.80, QLoRA 0.60: QLoRA keeps (0.6 - 0.2) / (0.8 - 0.2) = 2/3 of LoRA's gain; the old
    ratio of accuracies, 0.6 / 0.8 = 0.75, credited QLoRA with what the base already knew."""
    vs = by_name(gate.pre_merge_gates(G, EM, base=rows(0.20), lora=rows(0.80), qlora=rows(0.60)))
    assert vs["retention_vs_lora"]["value"] == pytest.approx(2 / 3, abs=1e-6)
    assert "(QLoRA 0.6000 - base 0.2000) / (LoRA 0.8000 - base 0.2000)" in vs["retention_vs_lora"]["detail"]


@pytest.mark.parametrize("threshold", [0.9, 0.01])
def test_lora_no_better_than_base_fails_retention_and_says_why(threshold):
    """Issue 17: with LoRA at 0 the old `q / l if l > 0 else (1.0 if q >= l else 0.0)` passed automatically
    (its 0.0 branch could never run). A baseline that learned nothing cannot vouch for QLoRA: FAIL, named,
    whatever the retention threshold (QLoRA at 0.50 would have "kept" any share of a zero gain)."""
    g = GateParams(min_gain_over_base=0.0, min_retention_vs_lora=threshold)
    for base, lora in ((rows(0.0), rows(0.0)), (rows(0.30), rows(0.30, shift=50))):  # LoRA at 0; LoRA = base
        v = by_name(gate.pre_merge_gates(g, EM, base=base, lora=lora, qlora=rows(0.50)))["retention_vs_lora"]
        assert v["passed"] is False and v["decided_on"] == "LoRA gain over base <= 0"
        assert "no better than base" in v["detail"] and "learned nothing" in v["detail"]
        assert "retention_vs_lora: LoRA gain over base <= 0" in gate.explain([v])


def test_retention_threshold_zero_turns_the_gate_off():
    """The integration tests' untrained tiny models set min_retention_vs_lora: 0 to switch the gate off: it
    passes, says it was not required, and still reports what it saw (here: LoRA learned nothing; QLoRA
    below the base, a negative share)."""
    g = GateParams(min_gain_over_base=-1.0, min_retention_vs_lora=0.0)
    v = by_name(gate.pre_merge_gates(g, EM, rows(0.0), rows(0.0), rows(0.0)))["retention_vs_lora"]
    assert v["passed"] and v["decided_on"] == "not required (gates.min_retention_vs_lora = 0)"
    assert "learned nothing" in v["detail"] and "not required" in v["detail"]
    v = by_name(gate.pre_merge_gates(g, EM, rows(0.10), rows(0.20), rows(0.05)))["retention_vs_lora"]
    assert v["passed"] and v["value"] == pytest.approx(-0.5)


def test_merge_gate_counts_flips_in_both_directions():
    q = ["a"] * 100
    m = ["b"] * 5 + ["a"] * 95  # 5 rows changed answer ...
    same_acc_other_flips = ["b"] * 3 + ["a"] * 97
    s = [1.0] * 100
    g = GateParams(max_merge_disagreement=0.12)  # decided on the upper bound: 5/100 -> 0.113
    v = gate.merge_gate(g, EM, s, s, q, m)
    assert v["value"] == 0.05 and v["passed"] and v["ci_low"] < 0.05 < v["ci_high"] <= 0.12
    drift = ["x"] * 10 + ["a"] * 90  # ... vs a drifting merge: 10 % of answers changed
    assert not gate.merge_gate(g, EM, s, s, q, drift)["passed"]
    assert gate.merge_gate(g, EM, s, s, q, same_acc_other_flips)["value"] == 0.03


def test_merge_gate_compares_normalised_answers():
    """Issue 17: documented as normalised answers, but raw strings were compared: a merge that only changed
    case or a trailing period (the same exact-match score on every row) counted as 100% disagreement."""
    q = ["json", "os", "re"] * 20
    m = ["JSON.", " os", "`re`"] * 20
    s = [1.0] * 60
    v = gate.merge_gate(GateParams(max_merge_disagreement=0.06), EM, s, s, q, m)  # 0/60: upper bound 0.0597
    assert v["value"] == 0.0 and v["passed"] and "0/60 rows" in v["detail"]


def test_default_run_verdict_values_by_hand():
    """The default task (107 test rows): base 0/107, LoRA 67/107 = 0.6262, QLoRA 64/107 = 0.5981, merged
    answers differ on 1/107 rows. With base = 0 every verdict value stays what it was: gain 64/107 = 0.5981,
    retention (64/107 - 0) / (67/107 - 0) = 64/67 = 0.9552, merge 1/107 = 0.0093."""
    n = 107
    base, lora, qlora = [False] * n, [True] * 67 + [False] * 40, [True] * 64 + [False] * 43
    vs = by_name(gate.pre_merge_gates(GateParams(), EM, base, lora, qlora))
    ans = ["json"] * n
    vs["merge"] = gate.merge_gate(GateParams(), EM, qlora, qlora, ans, ["os"] + ans[1:])
    assert round(vs["gain_over_base"]["value"], 4) == 0.5981 == round(64 / 107, 4)
    assert round(vs["retention_vs_lora"]["value"], 4) == 0.9552 == round(64 / 67, 4)
    assert round(vs["merge"]["value"], 4) == 0.0093 == round(1 / 107, 4)
    assert all(v["passed"] for v in vs.values())


def test_details_print_the_confidence_they_use():
    """Issue 17: "95%" was printed whatever `confidence` was (0.975 printed as 98%)."""
    g = GateParams(confidence=0.975)
    vs = gate.pre_merge_gates(g, EM, rows(0.05), rows(0.70), rows(0.68))
    vs.append(gate.merge_gate(g, EM, rows(0.68), rows(0.68), ["a"] * N, ["a"] * N))
    assert all("97.5% CI" in v["detail"] and "95%" not in v["detail"] and v["confidence"] == 0.975 for v in vs)


# ---------------------------------------------------------------- continuous metrics

def _scores(mean: float, n: int = 300, seed: int = 0, sd: float = 0.25) -> np.ndarray:
    """ROUGE-ish per-row scores: clipped to 0..1 (so exact 0s and 1s), then shifted to the wanted mean."""
    x = np.clip(np.random.default_rng(seed).normal(0.5, sd, n), 0, 1)
    return x - x.mean() + mean


def test_continuous_gates_in_metric_units():
    rl = get("rouge_l")
    base, lora = _scores(0.20, seed=1), _scores(0.45, seed=2)
    qlora = _scores(0.44, seed=2)  # LoRA's rows, 0.01 lower each: keeps (0.44 - 0.2) / (0.45 - 0.2) = 0.96
    vs = by_name(gate.pre_merge_gates(G, rl, base, lora, qlora))
    g, r = vs["gain_over_base"], vs["retention_vs_lora"]
    assert g["value"] == pytest.approx(0.24) and g["ci_low"] < 0.24 < g["ci_high"] and g["passed"]
    assert "sign-flip permutation p=" in g["detail"] and g["metric"] == "rouge_l"
    assert r["value"] == pytest.approx(0.96) and r["passed"] and r["ci_low"] < 0.96 < r["ci_high"]  # the ratio's own
    assert "QLoRA vs LoRA -0.0100, 95% CI [-0.0100, -0.0100]" in r["detail"]  # paired: exactly -0.01 on every row


def test_continuous_merge_gate_is_the_mean_absolute_score_change():
    rl = get("rouge_l")
    q = _scores(0.5, n=100, seed=3)
    merged = q.copy()
    merged[:10] += 0.3   # 10 rows up by 0.3 ...
    merged[10:20] -= 0.3  # ... 10 down: the mean is unchanged, the merge is not
    answers = ["same"] * 100
    v = gate.merge_gate(G, rl, q, merged, answers, ["changed"] * 20 + answers[20:])
    assert v["value"] == pytest.approx(0.06) and not v["passed"] and v["ci_low"] < 0.06 < v["ci_high"]
    assert "mean |merged - QLoRA| rouge_l per row = 0.0600" in v["detail"] and "20/100 rows" in v["detail"]
    assert gate.merge_gate(G, rl, q, q, answers, answers)["value"] == 0.0


def test_nll_direction_lower_is_better():
    """nll: QLoRA's nll 0.5 below the base's on every row is a gain of +0.5 (a reduction); a gate that did
    not know the direction would see -0.5 and refuse it."""
    nll = get("nll")
    base = np.random.default_rng(5).uniform(2.0, 4.0, 200)
    lora, qlora = base - 0.6, base - 0.55
    vs = by_name(gate.pre_merge_gates(G, nll, base, lora, qlora))
    g, r = vs["gain_over_base"], vs["retention_vs_lora"]
    assert g["value"] == pytest.approx(0.55) and g["ci_low"] == pytest.approx(0.55) and g["passed"]
    assert "lower is better" in g["detail"]
    assert r["value"] == pytest.approx(0.55 / 0.6) and r["passed"] and r["ci_low"] == pytest.approx(0.55 / 0.6)
    worse = by_name(gate.pre_merge_gates(G, nll, base, base + 0.5, base + 0.5))
    assert not worse["gain_over_base"]["passed"] and worse["gain_over_base"]["value"] == pytest.approx(-0.5)
    assert not worse["retention_vs_lora"]["passed"]  # LoRA's nll went up: no gain to retain


def test_nll_promotion_across_tokenizers_is_refused():
    """nll is nats per token: a champion scored under another tokenizer counts other tokens, so even a
    candidate far lower on every row is not promoted on it; under the same tokenizer it is."""
    from qlora_ops.tasks.core.config import Params
    from qlora_ops.tasks.gates import verdict

    p = Params.model_validate({"eval": {"metric": "nll"}})
    ids = [f"r{i}" for i in range(300)]
    champ = {"ids": ids, "version": 3, "tokenizer": "aaaa", "correct": [False] * 300,
             "scores": {"nll": [3.0] * 300, "exact_match": [0.0] * 300}}
    cand = {**champ, "tokenizer": "bbbb", "scores": {"nll": [1.0] * 300, "exact_match": [0.0] * 300}}
    d = verdict.promotion(p, cand, champ)
    assert not d["promote"] and "another tokenizer" in d["reason"] and "bits per byte" in d["reason"]
    assert verdict.promotion(p, {**cand, "tokenizer": "aaaa"}, champ)["promote"]


# ---------------------------------------------------------------- suites

def test_non_inferior_suite_refuses_a_forgetting_candidate_and_names_the_suite():
    rl = get("rouge_l")
    base = _scores(0.60, n=400, seed=7)
    forgot = base - 0.05  # 0.05 worse on every row of the general-behaviour suite
    v = gate.suite_gate("general", "non_inferior", rl, base, forgot, threshold=0.02, confidence=0.95)
    assert (v["name"], v["suite"], v["op"], v["threshold"], v["passed"]) == ("general:non_inferior", "general", ">=",
                                                                            -0.02, False)
    assert "suite 'general'" in v["detail"] and "general:non_inferior" in gate.explain([v])
    kept = base + np.random.default_rng(8).normal(0, 0.01, 400)  # the same behaviour, a little noise
    assert gate.suite_gate("general", "non_inferior", rl, base, kept, threshold=0.02, confidence=0.95)["passed"]


def test_gain_suite_and_roles():
    em = get("exact_match")
    base, cand = rows(0.10), rows(0.60)
    v = gate.suite_gate("domain-extra", "gain", em, base, cand, threshold=0.3, confidence=0.9)
    assert v["name"] == "domain-extra:gain" and v["passed"] and v["ci_low"] >= 0.3 and "90% CI" in v["detail"]
    assert not gate.suite_gate("domain-extra", "gain", em, base, cand, threshold=0.55, confidence=0.9)["passed"]
    with pytest.raises(ValueError, match="'report' suites are only shown"):
        gate.suite_gate("x", "report", em, base, cand, threshold=0.0, confidence=0.95)
    nll = get("nll")  # a non_inferior suite on nll: higher nll on the suite is a loss
    b = np.random.default_rng(9).uniform(1, 2, 300)
    assert not gate.suite_gate("general", "non_inferior", nll, b, b + 0.1, threshold=0.05, confidence=0.95)["passed"]
    assert gate.suite_gate("general", "non_inferior", nll, b, b - 0.1, threshold=0.05, confidence=0.95)["passed"]


def test_a_class_that_loses_to_the_champion_blocks_promotion_when_the_class_guard_is_on(monkeypatch):
    """gates.max_class_loss (issue 26, item 6): a candidate better overall that loses one class's recall against
    the champion by more than the margin is not promoted, naming the class; off (the default), the overall
    decision stands, and the default's fingerprint is what it was before the setting existed."""
    from qlora_ops.tasks.core.config import Params
    from qlora_ops.tasks.gates import verdict

    labels = ["json", "os", "re", "math"]
    n = 400
    ids = [f"r{i}" for i in range(n)]
    refs = {rid: labels[i % 4] for i, rid in enumerate(ids)}
    champ_ok = [i % 4 != 0 or i % 8 == 0 for i in range(n)]  # every class right except half of "json"
    cand_ok = [True if i % 4 != 1 else (i // 4) % 4 != 0 for i in range(n)]  # json perfect now; "os" loses a quarter
    champ = {"ids": ids, "version": 2, "correct": champ_ok, "scores": {"exact_match": [float(x) for x in champ_ok]}}
    cand = {"ids": ids, "correct": cand_ok, "scores": {"exact_match": [float(x) for x in cand_ok]}}

    off = Params.model_validate({"data": {"labels": labels}})
    assert verdict.class_guards(off, cand, champ, refs) == []
    on = Params.model_validate({"data": {"labels": labels}, "gates": {"max_class_loss": 0.1},
                                "registry": {"min_improvement": 0.0, "yearly_false_promotion": None}})
    guards = verdict.class_guards(on, cand, champ, refs)
    by = {g["name"]: g for g in guards}
    assert set(by) == {f"class {c}:non_inferior_vs_champion" for c in labels}
    assert not by["class os:non_inferior_vs_champion"]["passed"] and "class 'os' recall" in by["class os:non_inferior_vs_champion"]["detail"]
    assert all(g["passed"] for k, g in by.items() if k != "class os:non_inferior_vs_champion")
    free = verdict.promotion(on, cand, champ, [])
    assert free["promote"], free["reason"]  # overall the candidate is better ...
    d = verdict.promotion(on, cand, champ, guards)
    assert not d["promote"] and "class os" in d["reason"]  # ... but it lost "os"
    # the setting off keeps every fingerprint an older qlora-ops computed; on, it is part of the verdict
    from qlora_ops.tasks.core import config

    before = Params().model_digest()
    assert before != Params.model_validate({"gates": {"max_class_loss": 0.1}}).model_digest()
    monkeypatch.setattr(config, "_ADDED_OFF", ())  # the null setting in the digest: every fingerprint would move
    assert Params().model_digest() != before
