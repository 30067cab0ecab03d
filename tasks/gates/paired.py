"""Paired tests and intervals: two models' per-row scores on the same rows in, numbers out.

Every comparison here is *paired*: both models answered the same test rows in the same order, so the
noise that matters is how the two models' per-row scores differ, not each model's own spread. Two paths:

- 0/1 scores (exact match): the discordant rows decide. Exact McNemar test, paired-bootstrap interval,
  Connor's power maths with the discordance rate psi (share of rows where the two models disagree).
- continuous scores (token F1, ROUGE-L, chrF, JSON field match, NLL): the paired-bootstrap interval of the
  mean difference, and a sign-flip permutation test of the mean difference (docs/gates.md: why this test
  and not Wilcoxon); power from the standard deviation of the per-row differences.

Also one model's own interval (Wilson, bootstrap) for reports, answer agreement (Clopper-Pearson) for the
merge gate, and the minimum detectable difference. What these numbers decide is tasks.gates.policy; the
simulation that measures the policy's error rates is tasks.gates.simulate.

`binary=None` detects the path (every value 0 or 1); a caller that knows its metric passes Metric.binary.
Pure numpy/scipy/statsmodels (no MLflow, Prefect or torch) so the gates, the reports and the simulation
share one implementation. docs/gates.md explains the policy.

Conventions: `a` is the candidate, `b` the reference; `diff = mean(a) - mean(b)` in the metric's units;
`higher_is_better=False` (nll) only changes which sign counts as better (decide, the gates). Intervals are
two-sided at `confidence`, so a lower bound is a one-sided test at (1 - confidence) / 2.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import optimize, stats
from statsmodels.stats.power import normal_power_het
from statsmodels.stats.proportion import proportion_confint

__all__ = [
    "ASSUMED_DISCORDANCE", "ASSUMED_SD", "accuracy_interval", "agreement", "level", "mean_abs_diff",
    "mean_interval", "min_detectable_diff", "paired_compare", "paired_noise", "passes_gain", "ratio_interval",
]

# Resampled row indices held in memory at once (~16 MB of int64): bounds memory for big test sets.
_BLOCK = 1 << 21
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


# ---------------------------------------------------------------- the gates' one rule

# Float slack for `bound >= threshold` (a bound is a ratio of integers, the threshold a decimal).
EPS = 1e-12


def passes_gain(gain: ArrayLike, gain_low: ArrayLike, p_value: ArrayLike, threshold: float,
                confidence: float) -> NDArray[np.bool_]:
    """The rule of every gain-type gate (docs/gates.md, "One rule"), elementwise: the paired test rejects
    "no difference" at alpha = 1 - confidence with the candidate ahead, AND the interval's lower bound of the
    gain (metric's direction) reaches `threshold`. The test keeps a collapsed bootstrap (1 row: [1, 1]) or a
    threshold of 0 (identical models: [0, 0]) from passing on the interval alone. A negative threshold claims
    no gain (it allows a loss: a non-inferiority bound, the tests' way to switch a gate off): the bound alone,
    which is the one-sided test of "worse than the threshold" at alpha / 2."""
    alpha = _check_confidence(confidence)
    if threshold < 0:
        return np.asarray(gain_low) >= threshold - EPS
    return ((np.asarray(gain) > 0) & (np.asarray(p_value) < alpha)
            & (np.asarray(gain_low) >= threshold - EPS))


def ratio_interval(num: ArrayLike, den: ArrayLike, *, confidence: float = 0.95, n_boot: int = 10_000,
                   seed: int = 0) -> tuple[float, float]:
    """Paired-bootstrap percentile interval of mean(num) / mean(den) (retention: QLoRA's gain over the base
    / LoRA's, per row). Both means come from the same resampled rows; a resample where the denominator is
    <= 0 (no gain to retain) counts as -inf, so it can only lower the lower bound."""
    alpha = _check_confidence(confidence)
    x = np.vstack([_values(num, "num"), _values(den, "den")]).astype(np.float64)
    boot = _bootstrap_means(x, n_boot, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(boot[1] > 0, boot[0] / np.where(boot[1] > 0, boot[1], 1.0), -np.inf)
    low, high = np.quantile(r, [alpha / 2, 1 - alpha / 2], method="inverted_cdf")  # no interpolation with -inf
    return float(low), float(high)


def signflip_p(d: ArrayLike, *, n_perm: int = 10_000, seed: int = 0) -> float:
    """The two-sided sign-flip permutation p-value of mean(d) (one vector of per-row differences)."""
    return float(_signflip_p(_values(d, "d").astype(np.float64)[None], n_perm, seed)[0])


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
