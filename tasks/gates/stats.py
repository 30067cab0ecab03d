"""Paired statistics for the gates and for promotion: per-row scores in, decisions with numbers out.

Every comparison here is *paired*: both models answered the same test rows in the same order, so the
noise that matters is how the two models' per-row scores differ, not each model's own spread. Two paths:

- 0/1 scores (exact match): the discordant rows decide. Exact McNemar test, paired-bootstrap interval,
  Connor's power maths with the discordance rate psi (share of rows where the two models disagree).
- continuous scores (token F1, ROUGE-L, chrF, JSON field match, NLL): the paired-bootstrap interval of the
  mean difference, and a sign-flip permutation test of the mean difference (docs/gates.md: why this test
  and not Wilcoxon); power from the standard deviation of the per-row differences.

`binary=None` detects the path (every value 0 or 1); a caller that knows its metric passes Metric.binary.
Pure numpy/scipy/statsmodels (no MLflow, Prefect or torch) so the gates, the reports and the simulation in
tests/code/test_stats.py share one implementation. docs/gates.md explains the policy.

Conventions: `a` is the candidate, `b` the reference; `diff = mean(a) - mean(b)` in the metric's units;
`higher_is_better=False` (nll) only changes which sign counts as better (decide, the gates). Intervals are
two-sided at `confidence`, so a lower bound is a one-sided test at (1 - confidence) / 2.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import integrate, optimize, special, stats
from statsmodels.stats.power import normal_power_het, normal_sample_size_one_tail
from statsmodels.stats.proportion import proportion_confint

__all__ = [
    "ASSUMED_DISCORDANCE", "ASSUMED_SD", "PromotionPolicy", "accuracy_interval", "agreement", "decide",
    "level", "mean_abs_diff", "mean_interval", "min_detectable_diff", "paired_compare", "paired_noise",
    "power_check", "rows_needed", "simulate", "simulate_scores", "simulate_year", "synthetic_pairs",
    "synthetic_scores",
]

# Resampled row indices held in memory at once (~16 MB of int64): bounds memory for big test sets.
_BLOCK = 1 << 21
# Float slack for `diff >= min_improvement` (diff is a ratio of integers, the threshold a decimal).
_EPS = 1e-12
# What power maths assume when nothing is measured: the share of rows two retrains of one task answer
# differently (0/1 scores), and the sd of their per-row score differences on a 0..1 text-overlap metric
# (synthetic_scores' ROUGE-L-shaped pairs measure 0.234; rounded up, so the assumption errs towards "more rows").
ASSUMED_DISCORDANCE = 0.10
ASSUMED_SD = 0.25
MCNEMAR = "mcnemar"
SIGNFLIP = "sign-flip permutation"


def level(confidence: float) -> str:
    """A confidence level as people write it: 0.95 -> '95%', 0.975 -> '97.5%' (never rounded to '98%')."""
    return f"{100 * confidence:.6g}%"


# ---------------------------------------------------------------- input checks

def _values(x: ArrayLike, name: str) -> NDArray:
    """One model's per-row scores as a 1-D array: bools kept, numbers as float64 (finite)."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector of per-row scores, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr
    if arr.size and not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must hold numbers (per-row scores) or booleans, one per test row")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or infinite scores: every test row needs a finite score")
    return arr


def _is01(v: NDArray) -> bool:
    return v.dtype == np.bool_ or bool(np.isin(v, (0.0, 1.0)).all())


def _correctness(x: ArrayLike, name: str) -> NDArray[np.bool_]:
    """One model's per-row correctness as a 1-D bool array (bools or 0/1 accepted)."""
    arr = _values(x, name)
    if not _is01(arr):
        raise ValueError(f"{name} must hold booleans (or 0/1), one per test row")
    return arr.astype(bool)


def _pair(a: ArrayLike, b: ArrayLike, binary: bool | None) -> tuple[NDArray, NDArray, bool]:
    """Two score vectors over the same rows, and which path they take; an empty test set is an error."""
    a, b = _values(a, "a"), _values(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must cover the same test rows in the same order: {a.size} vs {b.size} rows")
    if a.size == 0:
        raise ValueError("cannot compare models on an empty test set (n == 0): evaluate at least one row")
    both01 = _is01(a) and _is01(b)
    if binary is None:
        binary = both01
    elif binary and not both01:
        raise ValueError("binary=True (McNemar) needs booleans or 0/1 scores, one per test row; these hold other "
                         "values: pass binary=False (or the metric's Metric.binary) for a continuous metric")
    if binary:
        return a.astype(bool), b.astype(bool), True
    return a.astype(np.float64), b.astype(np.float64), False


def _check_confidence(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return 1.0 - confidence


# ---------------------------------------------------------------- paired comparison

def _mcnemar_p(b01: ArrayLike, b10: ArrayLike) -> NDArray[np.float64]:
    """Exact two-sided McNemar p-value: 2 * P(Binom(b01 + b10, 1/2) <= min(b01, b10)), capped at 1.

    The same formula statsmodels' `mcnemar(table, exact=True)` evaluates, written over arrays with
    scipy.stats.binom so a simulation scores thousands of draws at once (the unit test checks it equals
    statsmodels and a math.comb sum). No discordant pairs gives p = 1.
    """
    b01, b10 = np.asarray(b01), np.asarray(b10)
    return np.minimum(1.0, 2.0 * stats.binom.cdf(np.minimum(b01, b10), b01 + b10, 0.5))


def _bootstrap_means(score: NDArray[np.float64], n_boot: int, seed: int) -> NDArray[np.float64]:
    """Paired bootstrap of the row mean of `score` (draws x rows) -> (draws x n_boot).

    Resamples row indices with numpy's Generator. One set of resamples (from `seed`) serves every
    draw, so each draw gets exactly the interval paired_compare(..., seed=seed) gives it: resamples
    become per-row counts and hit all draws with one matrix product. The loop is over memory blocks
    of resamples (one block below ~10k rows x 200 resamples), never over single resamples.
    """
    m, n = score.shape
    rng = np.random.default_rng(seed)
    out = np.empty((m, n_boot))
    step = max(1, _BLOCK // n)
    for start in range(0, n_boot, step):
        k = min(step, n_boot - start)
        idx = rng.integers(0, n, size=(k, n))
        counts = np.bincount((idx + n * np.arange(k)[:, None]).ravel(), minlength=k * n).reshape(k, n)
        out[:, start:start + k] = score @ counts.T.astype(np.float64) / n
    return out


def _signflip_p(d: NDArray[np.float64], n_perm: int, seed: int) -> NDArray[np.float64]:
    """Two-sided paired permutation (sign-flip) p-value of the mean of `d` (draws x rows) -> (draws,).

    Under H0 the two models are exchangeable on every row, so each row's difference is as likely
    negated: the null distribution is the mean over sign flips. Exact (all 2^n flips) when 2^n <=
    n_perm, else n_perm random flips from `seed` with the +1 correction that keeps the p-value valid.
    The conventions are scipy.stats.permutation_test's (permutation_type="samples"): p = 2 * min(P(T <=
    t), P(T >= t)) capped at 1, ties within a relative tolerance; the unit tests check equality with
    it. Written over arrays for the same reason as _bootstrap_means: one set of flips serves every draw.
    """
    m, n = d.shape
    ones = np.ones(n)
    obs = d @ ones / n  # the same arithmetic as the null's, so the identity flip ties exactly
    gamma = (100 * np.finfo(np.float64).eps * np.maximum(np.abs(obs), np.abs(d).mean(axis=1)))[:, None]
    exact = n < 63 and 2 ** n <= n_perm
    total = 2 ** n if exact else n_perm
    le = np.zeros(m, dtype=np.int64)
    ge = np.zeros(m, dtype=np.int64)
    rng = np.random.default_rng([seed, 1])  # its own stream: not the bootstrap's resamples
    step = max(1, _BLOCK // max(n, m))
    for start in range(0, total, step):
        k = min(step, total - start)
        if exact:
            bits = (np.arange(start, start + k, dtype=np.int64)[:, None] >> np.arange(n)) & 1
        else:
            bits = rng.integers(0, 2, size=(k, n))
        null = d @ (1.0 - 2.0 * bits).T / n  # draws x k
        le += (null <= obs[:, None] + gamma).sum(axis=1)
        ge += (null >= obs[:, None] - gamma).sum(axis=1)
    adj = 0 if exact else 1
    return np.minimum(2.0 * np.minimum(le + adj, ge + adj) / (total + adj), 1.0)


def _compare_many(a: NDArray, b: NDArray, *, confidence: float, n_boot: int, seed: int,
                  binary: bool | None = None, n_perm: int = 10_000) -> dict[str, NDArray]:
    """paired_compare over many draws at once (rows of `a`, `b`): everything but `mdd`, as arrays."""
    alpha = _check_confidence(confidence)
    if n_boot < 1 or n_perm < 1:
        raise ValueError(f"n_boot and n_perm must be >= 1, got {n_boot}, {n_perm}")
    if binary is None:
        binary = a.dtype == np.bool_ and b.dtype == np.bool_
    n = a.shape[1]
    if binary:
        b01 = (a & ~b).sum(axis=1)  # a right, b wrong
        b10 = (~a & b).sum(axis=1)  # a wrong, b right
        boot = _bootstrap_means(a.astype(np.float64) - b, n_boot, seed)
        low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2], axis=1)
        p = _mcnemar_p(b01, b10)
        return {"n": n, "a_mean": a.mean(axis=1), "b_mean": b.mean(axis=1), "diff": (b01 - b10) / n,
                "ci_low": low, "ci_high": high, "p_value": p, "test": MCNEMAR, "binary": True,
                "a_acc": a.mean(axis=1), "b_acc": b.mean(axis=1), "b01": b01, "b10": b10, "mcnemar_p": p}
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    boot = _bootstrap_means(d, n_boot, seed)
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2], axis=1)
    return {"n": n, "a_mean": a.mean(axis=1), "b_mean": b.mean(axis=1), "diff": d.mean(axis=1),
            "ci_low": low, "ci_high": high, "p_value": _signflip_p(d, n_perm, seed), "test": SIGNFLIP,
            "binary": False, "sd": d.std(axis=1, ddof=1) if n > 1 else np.zeros(a.shape[0])}


def paired_compare(a: ArrayLike, b: ArrayLike, *, higher_is_better: bool = True, binary: bool | None = None,
                   confidence: float = 0.95, n_boot: int = 10_000, n_perm: int = 10_000, seed: int = 0) -> dict:
    """Compare model `a` (candidate) with model `b` on the same rows, per-row scores in the metric's units.

    Always: n, a_mean, b_mean, diff (= a_mean - b_mean), ci_low/ci_high (seeded paired-bootstrap
    percentile interval of diff at `confidence`), p_value (two-sided), test, binary, higher_is_better and
    mdd (the smallest true difference this n detects with 80% power at alpha = 1 - confidence, given the
    measured discordance or sd; inf when the rows show no disagreement to size it from).
    0/1 scores (binary): test "mcnemar", p_value the exact McNemar p, plus the old keys a_acc, b_acc, b01
    (rows a got right and b wrong), b10 (a wrong, b right), mcnemar_p and discordance; no discordant pairs
    -> p = 1.0 and interval [0, 0]. Continuous: test "sign-flip permutation" (n_perm flips, exact when
    2^n <= n_perm) and sd (of the per-row differences). n == 0 -> ValueError.
    """
    a, b, binary = _pair(a, b, binary)
    res = _compare_many(a[None], b[None], confidence=confidence, n_boot=n_boot, seed=seed, binary=binary,
                        n_perm=n_perm)
    out = {k: (v if k in ("n", "test", "binary") else v[0].item()) for k, v in res.items()}
    out["higher_is_better"] = bool(higher_is_better)
    if binary:
        out["discordance"] = (out["b01"] + out["b10"]) / out["n"]
        spread = {"discordance": out["discordance"]} if out["discordance"] > 0 else None
    else:
        spread = {"sd": out["sd"]} if out["sd"] > 0 else None
    out["mdd"] = (min_detectable_diff(out["n"], confidence=confidence, **spread) if spread else math.inf)
    return out


def paired_noise(a: ArrayLike, b: ArrayLike, *, binary: bool | None = None) -> dict[str, float]:
    """The measured noise of a paired difference, as power maths take it: {"discordance": share of rows
    the two disagree on} for 0/1 scores, {"sd": sd of the per-row differences} for continuous ones."""
    a, b, binary = _pair(a, b, binary)
    if binary:
        return {"discordance": float((a != b).mean())}
    d = a - b
    return {"sd": float(d.std(ddof=1)) if d.size > 1 else 0.0}


def agreement(a_answers: Sequence[object], b_answers: Sequence[object], *, confidence: float = 0.95,
              normalize: Callable[[str], str] | None = None) -> dict:
    """Share of rows where two models' answers differ (after `normalize`), with a Clopper-Pearson interval.

    For the merge gate: merged vs QLoRA disagreement counts flips in both directions, which an
    accuracy difference would let cancel out. `normalize` is the metric's own answer normalisation
    (tasks.gates.gate passes exact match's), so "JSON." and "json" count as the same answer, as when scored.
    Clopper-Pearson (exact, conservative) so that a gate on the upper bound is not optimistic when flips
    are rare. Returns n, differ, share, ci_low, ci_high.
    """
    alpha = _check_confidence(confidence)
    if len(a_answers) != len(b_answers):
        raise ValueError(f"answers must cover the same rows: {len(a_answers)} vs {len(b_answers)}")
    n = len(a_answers)
    if n == 0:
        raise ValueError("cannot measure agreement on an empty test set (n == 0)")
    norm = normalize or (lambda s: s)
    differ = sum(norm(x) != norm(y) for x, y in zip(a_answers, b_answers))
    low, high = proportion_confint(differ, n, alpha=alpha, method="beta")
    return {"n": n, "differ": int(differ), "share": differ / n, "ci_low": float(low), "ci_high": float(high)}


def mean_abs_diff(a: ArrayLike, b: ArrayLike, *, confidence: float = 0.95, n_boot: int = 10_000,
                  seed: int = 0) -> dict:
    """Mean |a - b| of two models' per-row scores with its paired-bootstrap percentile interval.

    The merge gate for continuous metrics: a merge that moves scores up on some rows and down on others
    shows here, where a mean difference would let them cancel. Returns n, value, ci_low, ci_high.
    """
    alpha = _check_confidence(confidence)
    a, b, _ = _pair(a, b, False)
    ad = np.abs(a - b)
    boot = _bootstrap_means(ad[None], n_boot, seed)[0]
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return {"n": int(ad.size), "value": float(ad.mean()), "ci_low": float(low), "ci_high": float(high)}


def accuracy_interval(correct: ArrayLike, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson interval of one model's accuracy, for reports (~100 rows: about +-9 points at 95%)."""
    alpha = _check_confidence(confidence)
    c = _correctness(correct, "correct")
    if c.size == 0:
        raise ValueError("cannot compute accuracy on an empty test set (n == 0)")
    low, high = proportion_confint(int(c.sum()), c.size, alpha=alpha, method="wilson")
    return float(low), float(high)


def mean_interval(scores: ArrayLike, confidence: float = 0.95, *, binary: bool | None = None,
                  n_boot: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Interval of one model's mean score, for reports: Wilson for 0/1 scores (accuracy_interval), the
    seeded bootstrap percentile interval of the mean for continuous ones."""
    alpha = _check_confidence(confidence)
    s = _values(scores, "scores")
    if s.size == 0:
        raise ValueError("cannot compute a mean score on an empty test set (n == 0)")
    if (_is01(s) if binary is None else binary):
        return accuracy_interval(s, confidence)
    low, high = np.quantile(_bootstrap_means(s.astype(np.float64)[None], n_boot, seed)[0], [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


# ---------------------------------------------------------------- power

def _noise(discordance: float | None, sd: float | None) -> tuple[Callable[[float], tuple[float, float]], float]:
    """(stds(d) -> per-row std of the paired difference under H0 and under d, largest possible d).

    0/1 scores (Connor 1987): sqrt(psi) and sqrt(psi - d^2), and |d| <= psi (a difference is made of
    discordant rows). Continuous: sd both, no cap. Neither given: 0/1 scores at ASSUMED_DISCORDANCE.
    """
    if discordance is not None and sd is not None:
        raise ValueError("give discordance (0/1 scores) or sd (continuous scores), not both")
    if sd is not None:
        if not (0.0 < sd < math.inf):
            raise ValueError(f"sd of the per-row differences must be > 0 and finite, got {sd}")
        return (lambda d: (sd, sd)), math.inf
    psi = ASSUMED_DISCORDANCE if discordance is None else discordance
    if not 0.0 < psi <= 1.0:
        raise ValueError(f"discordance must be in (0, 1], got {psi}")
    return (lambda d: (math.sqrt(psi), math.sqrt(max(psi - d * d, 0.0)))), psi


def min_detectable_diff(n: int, *, discordance: float | None = None, sd: float | None = None,
                        confidence: float = 0.95, power: float = 0.8) -> float:
    """Smallest true difference (metric units) an n-row paired test detects with `power`.

    0/1 scores: Connor's normal approximation for McNemar's test (R. J. Connor, "Sample size for testing
    differences in proportions for the paired-sample design", Biometrics 43(1):207-211, 1987):
    n = [z(1-alpha/2) sqrt(psi) + z(power) sqrt(psi - d^2)]^2 / d^2 with psi the discordance rate.
    A difference cannot exceed psi, so the search stops there: when not even d = psi is detectable the
    answer is inf (no difference these models' disagreement allows can be told).
    Continuous scores: the paired normal approximation with sd the std of the per-row differences,
    d = (z(1-alpha/2) + z(power)) sd / sqrt(n).
    Both evaluated with statsmodels' normal_power_het (quantiles from scipy.stats.norm) and solved for d
    with scipy's brentq.
    """
    alpha = _check_confidence(confidence)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    stds, cap = _noise(discordance, sd)
    sd0 = stds(0.0)[0]

    def gap(d: float) -> float:
        return float(normal_power_het(d, n, alpha / 2, std_null=sd0, std_alternative=stds(d)[1],
                                      alternative="larger")) - power

    if math.isinf(cap):  # continuous: bracket the root (power grows without bound in d)
        hi = sd0 / math.sqrt(n)
        while gap(hi) < 0:
            hi *= 2
    else:
        hi = cap * (1 - 1e-9)  # d < psi keeps the alternative's std positive
        if gap(hi) < 0:
            return math.inf
    return float(optimize.brentq(gap, 1e-12 * sd0, hi))


def rows_needed(policy: "PromotionPolicy", *, discordance: float | None = None, sd: float | None = None,
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


def power_check(policy: "PromotionPolicy", n: int, discordance: float | None = None, *, sd: float | None = None,
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


# ---------------------------------------------------------------- promotion policy

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


# ---------------------------------------------------------------- simulation: 0/1 scores

def synthetic_pairs(n: int, true_diff: float, *, discordance: float = 0.10, champion_acc: float = 0.70,
                    draws: int = 1000, seed: int = 0) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """(candidate, champion) correctness, each draws x n, from a known paired truth.

    Rows are i.i.d. over four cells: both right, only candidate right (discordance + true_diff) / 2,
    only champion right (discordance - true_diff) / 2, both wrong; champion accuracy = champion_acc.
    """
    only_cand, only_champ = (discordance + true_diff) / 2, (discordance - true_diff) / 2
    probs = np.array([champion_acc - only_champ, only_cand, only_champ, 1 - champion_acc - only_cand])
    if (probs < 0).any() or only_cand < 0 or only_champ < 0:
        raise ValueError(f"impossible truth: |true_diff| <= discordance <= accuracies required, got probs {probs}")
    cell = np.random.default_rng(seed).choice(4, size=(draws, n), p=probs)
    return (cell == 0) | (cell == 1), (cell == 0) | (cell == 2)


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


def simulate(policy: PromotionPolicy, n: int, true_diff: float, discordance: float = 0.10, *,
             champion_acc: float = 0.70, draws: int = 1000, seed: int = 0, n_boot: int = 2000) -> float:
    """Share of `draws` synthetic test sets on which decide() promotes a candidate truly `true_diff` better.

    Data come from synthetic_pairs(seed=seed); the bootstrap uses seed + 1 (independent stream).
    n_boot defaults to 2000 here (10_000 in decide) to keep the simulation fast: it only moves the
    bootstrap bound, and the binding condition is the exact McNemar test, which does not resample.
    """
    cand, champ = synthetic_pairs(n, true_diff, discordance=discordance, champion_acc=champion_acc,
                                  draws=draws, seed=seed)
    return float(_decide_many(policy, cand, champ, seed=seed + 1, n_boot=n_boot).mean())


def simulate_year(policy: PromotionPolicy, n: int, *, weeks: int = 52, draws: int = 1000, seed: int = 0,
                  champion_acc: float = 0.70, discordance: float = 0.10, n_boot: int = 200) -> float:
    """Share of years in which at least one equally good retrain takes champion, deciding every week on
    one reused n-row test set (0/1 scores).

    Each simulated year draws its test set once: row i is answered right with probability p_i ~ Beta,
    the same for every model (all equally good), with mean champion_acc and E[2 p (1 - p)] =
    discordance, so one week's pair is distributed exactly as synthetic_pairs'. Each week a fresh
    retrain answers the same rows and decide() (vectorised) compares it with the current champion,
    which it replaces when promoted: the dependence a reused test set creates is in the simulation.
    n_boot = 200: the bootstrap only moves the non-inferiority bound, which does not bind for 0/1 scores
    with the default margin (a significant McNemar result implies a bound well above -margin).
    """
    mu, half = champion_acc, discordance / 2
    var = mu * (1 - mu) - half
    if not 0 < var < mu * (1 - mu):
        raise ValueError(f"discordance {discordance} impossible at accuracy {champion_acc}")
    kappa = mu * (1 - mu) / var - 1
    rng = np.random.default_rng(seed)
    p = rng.beta(mu * kappa, (1 - mu) * kappa, size=(draws, n))
    champ = rng.random((draws, n)) < p
    ever = np.zeros(draws, dtype=bool)
    for week in range(weeks):
        cand = rng.random((draws, n)) < p
        won = _decide_many(policy, cand, champ, seed=seed + 1 + week, n_boot=n_boot)
        champ[won] = cand[won]
        ever |= won
    return float(ever.mean())


# ---------------------------------------------------------------- simulation: continuous (ROUGE-L-shaped) scores

@dataclass(frozen=True)
class _Shape:
    """Per-row score distribution shaped like real ROUGE-L: exact 0s (nothing in common with the
    reference), exact 1s (the reference verbatim), the rest spread over 0..1 (a Kumaraswamy(a, b), Beta-
    like with a closed-form quantile). Two models' rows are linked by a Gaussian copula (latent
    correlation rho) and by `same`, the share of rows where they write the identical answer."""

    p0: float = 0.15
    p1: float = 0.20
    a: float = 1.5
    b: float = 2.0
    rho: float = 0.7
    same: float = 0.35

    def quantile(self, u: NDArray) -> NDArray:
        mid = np.clip((u - self.p0) / (1 - self.p0 - self.p1), 0.0, 1.0)
        spread = (1 - (1 - mid) ** (1 / self.b)) ** (1 / self.a)
        return np.where(u < self.p0, 0.0, np.where(u > 1 - self.p1, 1.0, spread))

    def mean(self, shift: float) -> float:
        """E[score] of a model whose latent is shifted by `shift`: the 1s' mass plus the spread part
        (scipy's quad over the latent; a scalar integrand, ~150x faster than calling quantile())."""
        z0, z1 = stats.norm.ppf(self.p0), stats.norm.ppf(1 - self.p1)

        def spread(z: float) -> float:
            m = min(max((float(special.ndtr(z)) - self.p0) / (1 - self.p0 - self.p1), 0.0), 1.0)
            density = math.exp(-(z - shift) ** 2 / 2) / math.sqrt(2 * math.pi)
            return (1 - (1 - m) ** (1 / self.b)) ** (1 / self.a) * density

        return float(stats.norm.sf(z1 - shift)) + integrate.quad(spread, z0, z1, epsabs=1e-12, epsrel=1e-12)[0]


ROUGE_SHAPE = _Shape()


def synthetic_scores(n: int, true_diff: float, *, draws: int = 1000, seed: int = 0, collapse: float = 0.0,
                     shape: _Shape = ROUGE_SHAPE) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(candidate, champion) per-row scores, each draws x n, ROUGE-L-shaped, the candidate's mean exactly
    `true_diff` above the champion's.

    The champion's rows follow `shape`. On a `shape.same` share of rows the candidate writes the same
    answer (same score); elsewhere its answer is another draw from the same distribution, correlated
    through the copula, with the latent shifted so the means differ by true_diff. `collapse` > 0: on that
    share of those rows the candidate's answer is garbage (score 0) and the shift makes up for it, so a
    candidate exactly as good on average wins small on most rows and loses big on a few (the case where
    a rank test and the mean disagree; docs/gates.md).
    """
    base = shape.mean(0.0)

    def mean_diff(s: float) -> float:
        return (1 - shape.same) * ((1 - collapse) * shape.mean(s) - base) - true_diff

    shift = 0.0 if true_diff == 0 and collapse == 0 else float(optimize.brentq(mean_diff, -8, 8, xtol=1e-12))
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((draws, n))
    w = shape.rho * z + math.sqrt(1 - shape.rho ** 2) * rng.standard_normal((draws, n))
    champ = shape.quantile(special.ndtr(z))
    fresh = shape.quantile(special.ndtr(w + shift))
    if collapse:
        fresh = np.where(rng.random((draws, n)) < collapse, 0.0, fresh)
    cand = np.where(rng.random((draws, n)) < shape.same, champ, fresh)
    return cand, champ


def _wilcoxon_p(d: NDArray[np.float64]) -> NDArray[np.float64]:
    """scipy's Wilcoxon signed-rank p-values per draw (normal approximation with tie correction)."""
    return np.asarray(stats.wilcoxon(d, axis=1, zero_method="wilcox", method="approx").pvalue, dtype=np.float64)


def simulate_scores(policy: PromotionPolicy, n: int, true_diff: float, *, draws: int = 1000, seed: int = 0,
                    n_boot: int = 2000, n_perm: int = 2000, collapse: float = 0.0, test: str = SIGNFLIP) -> float:
    """simulate() for continuous scores: share of draws on which decide() promotes a candidate truly
    `true_diff` better on synthetic_scores(seed=seed); bootstrap and flips from seed + 1. n_perm = 2000
    here (10_000 in decide): it only blurs p by ~0.005 around alpha. test="wilcoxon" swaps the paired
    test for scipy's Wilcoxon signed-rank, everything else equal (docs/gates.md's comparison)."""
    cand, champ = synthetic_scores(n, true_diff, draws=draws, seed=seed, collapse=collapse)
    p = None
    if test == "wilcoxon":
        p = _wilcoxon_p(cand - champ)
    elif test != SIGNFLIP:
        raise ValueError(f"test must be {SIGNFLIP!r} or 'wilcoxon', got {test!r}")
    return float(_decide_many(policy, cand, champ, seed=seed + 1, n_boot=n_boot, n_perm=n_perm, binary=False,
                              p_value=p).mean())


# ---------------------------------------------------------------- the tables of docs/gates.md

def _main() -> None:
    """Print the simulation tables of docs/gates.md: python -m tasks.gates.stats"""
    policy, diffs, sizes = PromotionPolicy(), (-0.05, -0.02, 0.0, 0.02, 0.05), (100, 500, 2000)
    header = "| n | " + " | ".join(f"{100 * d:+.0f} pts" for d in diffs)
    print(f"policy {policy}")
    print("\n0/1 scores (exact match): champion 0.70, discordance 0.10, 2000 draws per cell")
    print(header + " | old rule (cand > champ), equal |")
    print("|---" * (len(diffs) + 2) + "|")
    for n in sizes:
        rates = [simulate(policy, n, d, draws=2000, seed=n) for d in diffs]
        cand, champ = synthetic_pairs(n, 0.0, draws=2000, seed=n)
        old = float((cand.mean(axis=1) > champ.mean(axis=1)).mean())
        print(f"| {n} | " + " | ".join(f"{r:.1%}" for r in rates) + f" | {old:.1%} |")
    for n in (107, 500, 2000):
        print(f"power_check(n={n}): {power_check(policy, n)}")

    cand, champ = synthetic_scores(2000, 0.0, draws=50, seed=0)
    print(f"\ncontinuous scores (ROUGE-L-shaped: champion mean {champ.mean():.3f}, {np.mean(champ == 0):.0%} exact 0s, "
          f"{np.mean(champ == 1):.0%} exact 1s, identical answers on {np.mean(cand == champ):.0%} of rows, "
          f"sd of the per-row differences {(cand - champ).std(axis=1, ddof=1).mean():.3f}); "
          "sign-flip permutation test; 2000 draws per cell")
    print("| n | " + " | ".join(f"{d:+.2f}" for d in diffs) + " | old rule (cand > champ), equal |")
    print("|---" * (len(diffs) + 2) + "|")
    for n in sizes:
        rates = [simulate_scores(policy, n, d, draws=2000, seed=n) for d in diffs]
        cand, champ = synthetic_scores(n, 0.0, draws=2000, seed=n)
        old = float((cand.mean(axis=1) > champ.mean(axis=1)).mean())
        print(f"| {n} | " + " | ".join(f"{r:.1%}" for r in rates) + f" | {old:.1%} |")
    for n in (107, 500, 2000):
        print(f"power_check(n={n}, sd={ASSUMED_SD}): {power_check(policy, n, sd=ASSUMED_SD)}")

    print("\nwhich paired test (continuous): promotion rate of an equally good candidate (mean difference 0), "
          "2000 draws per cell")
    print("| n | differences | sign-flip permutation | Wilcoxon signed-rank |")
    print("|---|---|---|---|")
    for n in sizes:
        for collapse, what in ((0.0, "symmetric"), (0.1, "skewed: small wins, 10% collapses to 0")):
            rates = [simulate_scores(policy, n, 0.0, draws=2000, seed=n, collapse=collapse, test=t)
                     for t in (SIGNFLIP, "wilcoxon")]
            print(f"| {n} | {what} | " + " | ".join(f"{r:.1%}" for r in rates) + " |")

    budget = PromotionPolicy(yearly_false_promotion=0.05)
    print("\nover a year: weekly decisions on one reused test set, every retrain equally good "
          "(0/1 scores, champion 0.70, discordance 0.10), 1000 simulated years per cell")
    print("| n | per decision (simulate) | 1 - (1 - rate)^52 | >= 1 false promotion in 52 weeks (simulated) "
          "| with yearly_false_promotion 0.05: per year | its power, +5 pts |")
    print("|---|---|---|---|---|---|")
    for n in (107, 500, 2000):
        rate = simulate(policy, n, 0.0, draws=4000, seed=n)
        year = simulate_year(policy, n, draws=1000, seed=n)
        year_b = simulate_year(budget, n, draws=1000, seed=n)
        power_b = simulate(budget, n, 0.05, draws=2000, seed=n)
        print(f"| {n} | {rate:.2%} | {1 - (1 - rate) ** 52:.1%} | {year:.1%} | {year_b:.1%} | {power_b:.1%} |")


if __name__ == "__main__":
    _main()
