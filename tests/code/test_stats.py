"""tasks.stats: paired comparison numbers by hand, intervals that cover, and a promotion policy whose
error rates are measured by simulation against the targets of docs/gates.md (and against the old
`candidate > champion` rule, so the simulation demonstrably discriminates)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm
from statsmodels.stats.contingency_tables import mcnemar

from tasks.stats import (
    PromotionPolicy, _compare_many, _decide_many, _mcnemar_p, accuracy_interval, agreement, decide,
    min_detectable_diff, paired_compare, power_check, rows_needed, simulate, synthetic_pairs,
)

POLICY = PromotionPolicy()


def _hand_built() -> tuple[np.ndarray, np.ndarray]:
    """40 rows: 20 both right, 7 only a right, 2 only b right, 11 both wrong, in a shuffled order."""
    a = np.array([1] * 20 + [1] * 7 + [0] * 2 + [0] * 11, dtype=bool)
    b = np.array([1] * 20 + [0] * 7 + [1] * 2 + [0] * 11, dtype=bool)
    order = np.random.default_rng(7).permutation(40)
    return a[order], b[order]


# ---------------------------------------------------------------- paired_compare

def test_paired_compare_hand_built_counts_and_exact_mcnemar():
    a, b = _hand_built()
    r = paired_compare(a, b)
    assert (r["n"], r["b01"], r["b10"]) == (40, 7, 2)
    assert r["a_acc"] == 27 / 40 and r["b_acc"] == 22 / 40 and r["diff"] == pytest.approx(5 / 40)
    # Exact two-sided McNemar by hand: 2 * P(Binom(9, 1/2) <= 2).
    by_hand = 2 * sum(math.comb(9, k) for k in range(3)) / 2 ** 9
    assert by_hand == pytest.approx(0.1796875)
    assert r["mcnemar_p"] == pytest.approx(by_hand)
    assert r["mcnemar_p"] == pytest.approx(mcnemar([[20, 7], [2, 11]], exact=True).pvalue)
    assert r["ci_low"] <= r["diff"] <= r["ci_high"] and r["ci_low"] < 0 < r["ci_high"]  # p > 0.05
    assert 0 < r["mdd"] < 1
    assert paired_compare(a, b) == r  # seeded: same numbers twice
    assert paired_compare(a.astype(int), b.astype(int)) == r  # 0/1 accepted


def test_vectorised_mcnemar_equals_statsmodels():
    for b01 in range(0, 13):
        for b10 in range(0, 13):
            ref = mcnemar([[5, b01], [b10, 5]], exact=True).pvalue
            assert _mcnemar_p(b01, b10) == pytest.approx(ref, abs=1e-12)


def test_no_discordant_pairs_gives_p_one_and_zero_interval():
    a = np.array([1, 0, 1, 1, 0], dtype=bool)
    r = paired_compare(a, a.copy())
    assert (r["b01"], r["b10"], r["mcnemar_p"], r["ci_low"], r["ci_high"], r["diff"]) == (0, 0, 1.0, 0.0, 0.0, 0.0)
    assert r["mdd"] > 0  # discordance floored at one row: identical models do not claim infinite power


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="empty test set"):
        paired_compare([], [])
    with pytest.raises(ValueError, match="same test rows"):
        paired_compare([True, False], [True])
    with pytest.raises(ValueError, match="booleans"):
        paired_compare([0.3, 1.0], [1, 0])
    with pytest.raises(ValueError, match="1-D"):
        paired_compare([[True]], [[True]])
    with pytest.raises(ValueError, match="empty"):
        accuracy_interval([])
    with pytest.raises(ValueError, match="empty"):
        agreement([], [])


def test_interval_contains_true_diff_seeded_and_covers_about_95_percent():
    cand, champ = synthetic_pairs(500, 0.05, draws=1, seed=3)
    r = paired_compare(cand[0], champ[0], seed=11)
    assert r["ci_low"] < 0.05 < r["ci_high"]
    cand, champ = synthetic_pairs(500, 0.05, draws=400, seed=4)
    many = _compare_many(cand, champ, confidence=0.95, n_boot=2000, seed=5)
    coverage = np.mean((many["ci_low"] <= 0.05) & (0.05 <= many["ci_high"]))
    assert 0.91 <= coverage <= 0.98, coverage


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=60), st.integers(0, 2 ** 16))
def test_paired_compare_is_antisymmetric_and_consistent(rows, seed):
    a, b = np.array(rows, dtype=bool).T
    ab = paired_compare(a, b, n_boot=200, seed=seed)
    ba = paired_compare(b, a, n_boot=200, seed=seed)
    assert ab["diff"] == pytest.approx(ab["a_acc"] - ab["b_acc"]) == pytest.approx((ab["b01"] - ab["b10"]) / ab["n"])
    assert (ab["b01"], ab["b10"]) == (ba["b10"], ba["b01"]) and ab["mcnemar_p"] == ba["mcnemar_p"]
    assert ba["ci_low"] == pytest.approx(-ab["ci_high"]) and ba["ci_high"] == pytest.approx(-ab["ci_low"])
    assert -1 <= ab["ci_low"] <= ab["ci_high"] <= 1 and 0 < ab["mcnemar_p"] <= 1


# ---------------------------------------------------------------- agreement / accuracy

def test_agreement_counts_flips_in_both_directions():
    a = ["json", "os", "re", "math", "os", "re"]
    b = ["json", "re", "re", "math", "json", "re"]  # two flips, different directions
    r = agreement(a, b)
    assert (r["n"], r["differ"], r["share"]) == (6, 2, pytest.approx(2 / 6))
    assert r["ci_low"] < 2 / 6 < r["ci_high"]
    zero = agreement(["x"] * 107, ["x"] * 107)
    assert zero["differ"] == 0 and zero["ci_low"] == 0.0
    assert zero["ci_high"] == pytest.approx(1 - 0.025 ** (1 / 107))  # Clopper-Pearson, 0 of 107: ~3.4%
    with pytest.raises(ValueError, match="same rows"):
        agreement(["x"], ["x", "y"])


def test_accuracy_interval_is_about_nine_points_at_100_rows():
    low, high = accuracy_interval([True] * 70 + [False] * 30)
    assert low < 0.70 < high and 0.085 < (high - low) / 2 < 0.095


# ---------------------------------------------------------------- power

def test_rows_needed_matches_connor_and_is_monotone():
    z_a, z_b = norm.ppf(0.975), norm.ppf(0.8)
    connor = (z_a * math.sqrt(0.10) + z_b * math.sqrt(0.10 - 0.02 ** 2)) ** 2 / 0.02 ** 2
    assert rows_needed(POLICY) == math.ceil(connor)
    sizes = [rows_needed(POLICY, regression=r) for r in (0.01, 0.02, 0.03, 0.05, 0.10)]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    assert rows_needed(POLICY, power=0.9) > rows_needed(POLICY) > rows_needed(POLICY, discordance=0.05)
    assert rows_needed(PromotionPolicy(confidence=0.99)) > rows_needed(POLICY)
    with pytest.raises(ValueError, match="discordance"):
        rows_needed(POLICY, discordance=0.01, regression=0.02)


@pytest.mark.parametrize("effect", [0.01, 0.02, 0.05])
def test_min_detectable_diff_inverts_rows_needed(effect):
    n = rows_needed(POLICY, regression=effect)
    assert min_detectable_diff(n) <= effect < min_detectable_diff(n - 1)


def test_power_check_line_and_silence():
    line = power_check(POLICY, 107)
    assert line is not None and "\n" not in line
    assert line.startswith("test set has 107 rows: the policy can only promote a candidate >= 8.")
    assert "cannot tell a 2-point regression; ~1960 rows needed" in line
    assert power_check(POLICY, 2000) is None
    assert power_check(POLICY, 600, discordance=0.03) is None  # models that rarely disagree need fewer rows


# ---------------------------------------------------------------- policy and decide

def test_policy_validates_and_is_frozen():
    with pytest.raises(ValueError):
        PromotionPolicy(non_inferiority_margin=0.0)
    with pytest.raises(ValueError):
        PromotionPolicy(confidence=1.0)
    with pytest.raises(ValueError):
        PromotionPolicy(min_improvement=-0.01)
    with pytest.raises(dataclasses.FrozenInstanceError):
        POLICY.confidence = 0.5  # type: ignore[misc]


def test_decide_promotes_a_clear_gain_and_keeps_a_tie():
    cand, champ = synthetic_pairs(2000, 0.05, draws=1, seed=1)
    win = decide(POLICY, cand[0], champ[0])
    assert win["promote"] is True and win["reason"].startswith("promote: candidate ")
    assert {"n", "a_acc", "b_acc", "diff", "ci_low", "ci_high", "b01", "b10", "mcnemar_p", "mdd", "policy"} <= win.keys()
    a, b = _hand_built()  # +12.5 points on 40 rows, p = 0.18: not enough evidence
    keep = decide(POLICY, a, b)
    assert keep["promote"] is False
    assert keep["reason"].startswith("keep champion: candidate 67.5% vs champion 55.0% on 40 rows: +12.5 points")
    assert "not significantly better" in keep["reason"] and "non-inferiority margin" in keep["reason"]
    assert keep["reason"].count(".") >= 1 and keep["reason"].endswith(".")
    tie = decide(POLICY, b, b)
    assert tie["promote"] is False and "gain below the required 1.0 points" in tie["reason"]


def test_simulation_runs_the_real_decide():
    cand, champ = synthetic_pairs(150, 0.08, draws=12, seed=5)
    fast = _decide_many(POLICY, cand, champ, seed=6, n_boot=500)
    slow = [decide(POLICY, c, h, seed=6, n_boot=500)["promote"] for c, h in zip(cand, champ)]
    assert fast.tolist() == slow and 0 < sum(slow) < len(slow)
    many = _compare_many(cand, champ, confidence=0.95, n_boot=500, seed=6)
    one = paired_compare(cand[3], champ[3], n_boot=500, seed=6)
    assert (many["ci_low"][3], many["ci_high"][3]) == (one["ci_low"], one["ci_high"])


# ---------------------------------------------------------------- simulation targets

DRAWS = 1000


@pytest.mark.parametrize("n", [100, 500, 2000])
def test_simulated_promotion_rates_meet_targets(n):
    worse = simulate(POLICY, n, -0.02, draws=DRAWS, seed=n)
    equal = simulate(POLICY, n, 0.0, draws=DRAWS, seed=n)
    print(f"n={n}: promoted 2 pts worse {worse:.1%}, equal {equal:.1%}")
    assert worse <= 0.05, f"a 2-point regression is promoted {worse:.1%} of the time at n={n}"
    assert equal <= 0.05, f"an equal retrain takes champion {equal:.1%} of the time at n={n}"
    cand, champ = synthetic_pairs(n, 0.0, draws=DRAWS, seed=n)
    old = np.mean(cand.mean(axis=1) > champ.mean(axis=1))  # the old rule: higher point accuracy wins
    assert old > 0.30, f"old rule promotes an equal candidate only {old:.1%}: the simulation would not discriminate"


def test_simulated_power_for_a_real_gain():
    better = simulate(POLICY, 2000, 0.05, draws=DRAWS, seed=1)
    assert better >= 0.80, f"a 5-point gain is promoted only {better:.1%} of the time at n=2000"


def test_old_rule_fails_the_regression_target():
    """The <= 5% target can fail: on 100 rows the old rule promotes a 2-point regression ~20% of the time."""
    cand, champ = synthetic_pairs(100, -0.02, draws=DRAWS, seed=2)
    old = np.mean(cand.mean(axis=1) > champ.mean(axis=1))
    assert old > 0.10, old
    assert simulate(POLICY, 100, -0.02, draws=DRAWS, seed=2) <= 0.05
