"""The promotion policy: when a candidate may take `champion`, and whether a test set can support that.

PromotionPolicy holds the thresholds and the per-decision alpha (with a yearly false-promotion budget,
Bonferroni over the year's decisions); decide applies it to two models' per-row scores through
tasks.gates.paired (_decide_many: the same decision over many simulated draws at once, for
tasks.gates.simulate); rows_needed and power_check size the test set the policy needs. docs/gates.md
justifies the defaults.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from statsmodels.stats.power import normal_sample_size_one_tail

from qlora_ops.tasks.gates.paired import (
    ASSUMED_DISCORDANCE, ASSUMED_SD, _check_confidence, _compare_many, _noise, level, min_detectable_diff,
    paired_compare,
)

__all__ = ["PromotionPolicy", "decide", "power_check", "rows_needed"]

# Float slack for `diff >= min_improvement` (diff is a ratio of integers, the threshold a decimal).
_EPS = 1e-12


@dataclass(frozen=True)
class PromotionPolicy:
    """When a candidate may take `champion` (defaults justified in docs/gates.md). Units are the gate
    metric's (accuracy: 0..1, so 0.02 = 2 points; nll: nats per token).

    confidence: level of the paired interval; the significance test runs at alpha = 1 - confidence.
    non_inferiority_margin: the regression the test set must rule out: the interval's lower bound (in
        the metric's direction) must be above -margin. Also the effect rows_needed/power_check size for.
    min_improvement: smallest gain worth a release, so a huge test set does not churn the champion for
        a real but negligible gain.
    yearly_false_promotion: None, or the chance per year an equally good retrain may take champion on a
        schedule of decisions_per_year decisions (docs/gates.md, "Over a year"): each decision then runs
        at a one-sided alpha of yearly_false_promotion / decisions_per_year (Bonferroni: it holds whatever
        the dependence between decisions on one reused test set), never looser than `confidence`.
    """

    confidence: float = 0.95
    non_inferiority_margin: float = 0.02
    min_improvement: float = 0.01
    yearly_false_promotion: float | None = None
    decisions_per_year: int = 52

    @classmethod
    def from_registry(cls, r) -> "PromotionPolicy":
        """The policy params.registry configures (run, promote, check and init all use this one)."""
        return cls(confidence=r.confidence, non_inferiority_margin=r.non_inferiority_margin,
                   min_improvement=r.min_improvement, yearly_false_promotion=r.yearly_false_promotion,
                   decisions_per_year=r.decisions_per_year)

    def __post_init__(self) -> None:
        _check_confidence(self.confidence)
        if not 0.0 < self.non_inferiority_margin < 1.0:
            raise ValueError(f"non_inferiority_margin must be in (0, 1), got {self.non_inferiority_margin}")
        if not 0.0 <= self.min_improvement < 1.0:
            raise ValueError(f"min_improvement must be in [0, 1), got {self.min_improvement}")
        if self.yearly_false_promotion is not None and not 0.0 < self.yearly_false_promotion < 0.5:
            raise ValueError(f"yearly_false_promotion must be in (0, 0.5) or None, got {self.yearly_false_promotion}")
        if self.decisions_per_year < 1:
            raise ValueError(f"decisions_per_year must be >= 1, got {self.decisions_per_year}")

    @property
    def alpha(self) -> float:
        """Two-sided alpha of one decision: 1 - confidence, or the yearly budget's share when tighter."""
        a = 1.0 - self.confidence
        if self.yearly_false_promotion is not None:
            a = min(a, 2.0 * self.yearly_false_promotion / self.decisions_per_year)
        return a

    @property
    def decision_confidence(self) -> float:
        """The confidence each decision's interval and test run at (= confidence without a yearly budget)."""
        return 1.0 - self.alpha


# ---------------------------------------------------------------- power

def rows_needed(policy: PromotionPolicy, *, discordance: float | None = None, sd: float | None = None,
                regression: float = 0.02, power: float = 0.8) -> int:
    """Test rows needed to tell a `regression` (metric units) with `power` at the policy's alpha.

    Connor (1987) for 0/1 scores, the paired normal approximation for continuous ones, via statsmodels'
    normal_sample_size_one_tail (one tail at alpha/2 of the two-sided level, as the policy uses). For 0/1
    scores a difference cannot exceed the discordance rate, hence the check.
    """
    stds, cap = _noise(discordance, sd)
    if not 0.0 < regression <= cap:
        what = f"(0, discordance={cap}]" if math.isfinite(cap) else "(0, inf)"
        raise ValueError(f"regression must be in {what}, got {regression}")
    sd0, sd1 = stds(regression)
    n = normal_sample_size_one_tail(regression, power, policy.alpha / 2, std_null=sd0, std_alternative=sd1)
    return int(math.ceil(float(n)))


def power_check(policy: PromotionPolicy, n: int, discordance: float | None = None, *, sd: float | None = None,
                measured: str | None = None) -> str | None:
    """One line when an n-row test set cannot support the policy, else None.

    "Support" = it can tell a difference the size of the non-inferiority margin with 80% power at the
    policy's per-decision alpha. Pass what was measured (paired_noise: the discordance of 0/1 scores or
    the sd of continuous ones) and `measured` = which pair it was measured on; with neither,
    ASSUMED_DISCORDANCE (0/1 scores) is assumed, and `sd=ASSUMED_SD` is the continuous assumption. A
    measured 0 (two models that never disagreed) sizes nothing: the assumption is used and said.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    source = f"measured on {measured}" if measured else "assumed"
    if discordance == 0 or sd == 0:
        source = f"assumed: none measured on {measured or 'the rows'}"
        discordance, sd = (ASSUMED_DISCORDANCE, None) if discordance == 0 else (None, ASSUMED_SD)
    margin = policy.non_inferiority_margin
    _, cap = _noise(discordance, sd)
    binary = math.isfinite(cap)
    need = rows_needed(policy, discordance=discordance, sd=sd, regression=min(margin, cap))
    if n >= need:
        return None
    mdd = min_detectable_diff(n, discordance=discordance, sd=sd, confidence=policy.decision_confidence)
    floor = max(mdd, policy.min_improvement)
    tail = f"80% power, {level(policy.decision_confidence)} confidence"
    if binary:
        can = ("cannot promote any candidate (no difference within that disagreement is detectable)"
               if math.isinf(floor) else f"can only promote a candidate >= {100 * floor:.1f} points better")
        return (f"test set has {n} rows: the policy {can} and cannot tell a {100 * margin:g}-point regression; "
                f"~{need} rows needed (at {100 * cap:.3g}% discordance, {source}; {tail})")
    return (f"test set has {n} rows: the policy can only promote a candidate >= {floor:.3g} better (metric units) "
            f"and cannot tell a {margin:g} regression; ~{need} rows needed (at sd {sd:.3g} of the per-row "
            f"differences, {source}; {tail})")


# ---------------------------------------------------------------- decision

def _checks(policy: PromotionPolicy, res: dict, higher_is_better: bool = True) -> dict[str, NDArray[np.bool_]]:
    """The three promotion conditions, elementwise (scalars from decide, arrays from simulate).

    The gain is oriented: candidate - champion for higher-is-better metrics, champion - candidate for
    lower-is-better ones (nll), so its lower bound is -ci_high there.
    significant: the paired test (p < alpha, candidate ahead) is the binding test. For 0/1 scores exact
    McNemar stays exact when discordant rows are few, where the percentile bootstrap is optimistic (e.g.
    4-0 discordant on 100 rows: bootstrap lower bound > 0, McNemar p = 0.125).
    """
    s = 1.0 if higher_is_better else -1.0
    gain = s * np.asarray(res["diff"])
    gain_low = s * np.asarray(res["ci_low"] if higher_is_better else res["ci_high"])
    return {
        "non_inferior": gain_low > -policy.non_inferiority_margin,
        "big_enough": gain >= policy.min_improvement - _EPS,
        "significant": (gain > 0) & (np.asarray(res["p_value"]) < policy.alpha),
    }


def _reason(policy: PromotionPolicy, cmp: dict, checks: dict[str, bool], metric_name: str | None) -> str:
    """One sentence: verdict, the numbers, and every condition that failed (or that all held)."""
    s = 1 if cmp["higher_is_better"] else -1
    gain = s * cmp["diff"]
    lo, hi = sorted((s * cmp["ci_low"], s * cmp["ci_high"]))
    conf = level(policy.decision_confidence)
    if cmp["binary"]:
        def amount(x: float, signed: bool = True) -> str:
            return f"{100 * x:+.1f} points" if signed else f"{100 * x:.1f} points"

        head = (f"candidate {cmp['a_acc']:.1%} vs champion {cmp['b_acc']:.1%} on {cmp['n']} rows: "
                f"{100 * gain:+.1f} points ({conf} CI {100 * lo:+.1f} to {100 * hi:+.1f}, "
                f"{cmp['b01']} rows only the candidate got right vs {cmp['b10']} only the champion, "
                f"exact McNemar p={cmp['mcnemar_p']:.3g})")
    else:
        def amount(x: float, signed: bool = True) -> str:
            return f"{x:+.4g}" if signed else f"{x:.4g}"

        name = metric_name or "score"
        way = "higher" if cmp["higher_is_better"] else "lower"
        head = (f"candidate {name} {cmp['a_mean']:.4f} vs champion {cmp['b_mean']:.4f} on {cmp['n']} rows "
                f"({way} is better): gain {gain:+.4f} ({conf} CI {lo:+.4f} to {hi:+.4f}, paired {cmp['test']} "
                f"p={cmp['p_value']:.3g})")
    why = {
        "significant": f"not significantly better (needs p < {policy.alpha:.3g} with the candidate ahead)",
        "big_enough": f"gain below the required {amount(policy.min_improvement, False)}",
        "non_inferior": f"could be {amount(-lo, False)} worse, beyond the "
                        f"{amount(policy.non_inferiority_margin, False)} non-inferiority margin",
    }
    failed = [why[k] for k in why if not checks[k]]
    if failed:
        return f"keep champion: {head}; " + "; ".join(failed) + "."
    return (f"promote: {head}; significantly better, at least {amount(policy.min_improvement, False)} "
            f"up and within the {amount(policy.non_inferiority_margin, False)} non-inferiority margin.")


def decide(policy: PromotionPolicy, candidate: ArrayLike, champion: ArrayLike, seed: int = 0, *,
           n_boot: int = 10_000, n_perm: int = 10_000, higher_is_better: bool = True, binary: bool | None = None,
           metric_name: str | None = None) -> dict:
    """Should the candidate take `champion`? Per-row scores of both on the same rows. Promote only if all hold:

    1. non-inferior: paired interval lower bound of the gain (candidate - champion, in the metric's
       direction) > -non_inferiority_margin;
    2. worth it: point gain >= min_improvement;
    3. not chance: the paired test (exact McNemar for 0/1 scores, sign-flip permutation otherwise) gives
       p < policy.alpha with the candidate ahead.
    Interval and test run at policy.decision_confidence. Returns promote, reason (one sentence with the
    numbers), policy, and paired_compare's fields.
    """
    cmp = paired_compare(candidate, champion, higher_is_better=higher_is_better, binary=binary,
                         confidence=policy.decision_confidence, n_boot=n_boot, n_perm=n_perm, seed=seed)
    checks = {k: bool(v) for k, v in _checks(policy, cmp, higher_is_better).items()}
    return {"promote": all(checks.values()), "reason": _reason(policy, cmp, checks, metric_name), **cmp,
            "policy": asdict(policy)}


def _decide_many(policy: PromotionPolicy, cand: NDArray, champ: NDArray, *, seed: int, n_boot: int,
                 n_perm: int = 10_000, higher_is_better: bool = True, binary: bool | None = None,
                 p_value: NDArray | None = None) -> NDArray[np.bool_]:
    """decide(policy, cand[i], champ[i], seed, ...)["promote"] for every draw i, vectorised.

    `p_value` replaces the paired test's p-values (docs/gates.md compares Wilcoxon that way)."""
    res = _compare_many(cand, champ, confidence=policy.decision_confidence, n_boot=n_boot, seed=seed,
                        binary=binary, n_perm=n_perm)
    if p_value is not None:
        res["p_value"] = p_value
    c = _checks(policy, res, higher_is_better)
    return c["non_inferior"] & c["big_enough"] & c["significant"]
