"""Paired statistics for the gates and for promotion: per-example correctness in, decisions with numbers out.

Every comparison here is *paired*: both models answered the same test rows in the same order, so the
noise that matters is the rows where they disagree (discordant pairs), not each model's own binomial
noise. Pure numpy/scipy/statsmodels (no MLflow, Prefect or torch) so the gates, the reports and the
simulation in tests/code/test_stats.py share one implementation. docs/gates.md explains the policy.

Conventions: `a` is the candidate, `b` the reference; differences are `a - b` in accuracy (0..1);
intervals are two-sided at `confidence`, so a lower bound is a one-sided test at (1 - confidence) / 2.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import optimize, stats
from statsmodels.stats.power import normal_power_het, normal_sample_size_one_tail
from statsmodels.stats.proportion import proportion_confint

__all__ = [
    "PromotionPolicy", "accuracy_interval", "agreement", "decide", "min_detectable_diff",
    "paired_compare", "power_check", "rows_needed", "simulate", "synthetic_pairs",
]

# Resampled row indices held in memory at once (~16 MB of int64): bounds memory for big test sets.
_BLOCK = 1 << 21
# Float slack for `diff >= min_improvement` (diff is a ratio of integers, the threshold a decimal).
_EPS = 1e-12


# ---------------------------------------------------------------- input checks

def _correctness(x: ArrayLike, name: str) -> NDArray[np.bool_]:
    """One model's per-row correctness as a 1-D bool array (bools or 0/1 accepted)."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D per-example correctness vector, got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if arr.size and not (np.issubdtype(arr.dtype, np.number) and np.isin(arr, (0, 1)).all()):
            raise ValueError(f"{name} must hold booleans (or 0/1), one per test row")
        arr = arr.astype(bool)
    return arr


def _pair(a: ArrayLike, b: ArrayLike) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """Two correctness vectors over the same rows; an empty test set is an error, not accuracy 0."""
    a, b = _correctness(a, "a"), _correctness(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must cover the same test rows in the same order: {a.size} vs {b.size} rows")
    if a.size == 0:
        raise ValueError("cannot compare models on an empty test set (n == 0): evaluate at least one row")
    return a, b


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


def _compare_many(a: NDArray[np.bool_], b: NDArray[np.bool_], *, confidence: float, n_boot: int,
                  seed: int) -> dict[str, NDArray]:
    """paired_compare over many draws at once (rows of `a`, `b`): everything but `mdd`, as arrays."""
    alpha = _check_confidence(confidence)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    n = a.shape[1]
    b01 = (a & ~b).sum(axis=1)  # a right, b wrong
    b10 = (~a & b).sum(axis=1)  # a wrong, b right
    boot = _bootstrap_means(a.astype(np.float64) - b, n_boot, seed)
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2], axis=1)
    return {"n": n, "a_acc": a.mean(axis=1), "b_acc": b.mean(axis=1), "diff": (b01 - b10) / n,
            "ci_low": low, "ci_high": high, "b01": b01, "b10": b10, "mcnemar_p": _mcnemar_p(b01, b10)}


def paired_compare(a: ArrayLike, b: ArrayLike, *, confidence: float = 0.95, n_boot: int = 10_000,
                   seed: int = 0) -> dict:
    """Compare model `a` (candidate) with model `b` on the same rows.

    Returns n, a_acc, b_acc, diff (= a_acc - b_acc), ci_low/ci_high (seeded paired-bootstrap
    percentile interval of diff at `confidence`), b01 (rows a got right and b wrong), b10 (a wrong,
    b right), mcnemar_p (exact two-sided McNemar on b01 vs b10) and mdd (the smallest true difference
    this n detects with 80% power at alpha = 1 - confidence, given the observed discordance; see
    min_detectable_diff). No discordant pairs -> p = 1.0 and interval [0, 0]; n == 0 -> ValueError.
    """
    a, b = _pair(a, b)
    res = _compare_many(a[None], b[None], confidence=confidence, n_boot=n_boot, seed=seed)
    out = {k: (v if k == "n" else v[0].item()) for k, v in res.items()}
    # Floor the discordance at one row: identical models must not report "detects any difference".
    discordance = max(out["b01"] + out["b10"], 1) / out["n"]
    out["mdd"] = min_detectable_diff(out["n"], discordance=discordance, confidence=confidence)
    return out


def agreement(a_answers: Sequence[object], b_answers: Sequence[object], *, confidence: float = 0.95) -> dict:
    """Share of rows where two models' (normalised) answers differ, with a Clopper-Pearson interval.

    For the merge gate: merged vs QLoRA disagreement counts flips in both directions, which an
    accuracy difference would let cancel out. Clopper-Pearson (exact, conservative) so that a gate on
    the upper bound is not optimistic when flips are rare. Returns n, differ, share, ci_low, ci_high.
    """
    alpha = _check_confidence(confidence)
    if len(a_answers) != len(b_answers):
        raise ValueError(f"answers must cover the same rows: {len(a_answers)} vs {len(b_answers)}")
    n = len(a_answers)
    if n == 0:
        raise ValueError("cannot measure agreement on an empty test set (n == 0)")
    differ = sum(x != y for x, y in zip(a_answers, b_answers))
    low, high = proportion_confint(differ, n, alpha=alpha, method="beta")
    return {"n": n, "differ": int(differ), "share": differ / n, "ci_low": float(low), "ci_high": float(high)}


def accuracy_interval(correct: ArrayLike, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson interval of one model's accuracy, for reports (~100 rows: about +-9 points at 95%)."""
    alpha = _check_confidence(confidence)
    c = _correctness(correct, "correct")
    if c.size == 0:
        raise ValueError("cannot compute accuracy on an empty test set (n == 0)")
    low, high = proportion_confint(int(c.sum()), c.size, alpha=alpha, method="wilson")
    return float(low), float(high)


# ---------------------------------------------------------------- power

def _stds(diff: float, discordance: float) -> tuple[float, float]:
    """Per-row std of the paired difference under H0 and under diff (Connor 1987)."""
    if not 0.0 < discordance <= 1.0:
        raise ValueError(f"discordance must be in (0, 1], got {discordance}")
    return math.sqrt(discordance), math.sqrt(max(discordance - diff * diff, 0.0))


def min_detectable_diff(n: int, *, discordance: float = 0.10, confidence: float = 0.95,
                        power: float = 0.8) -> float:
    """Smallest true accuracy difference an n-row paired test detects with `power`.

    Approximation: Connor's normal approximation for McNemar's test (R. J. Connor, "Sample size for
    testing differences in proportions for the paired-sample design", Biometrics 43(1):207-211, 1987):
    n = [z(1-alpha/2) sqrt(psi) + z(power) sqrt(psi - d^2)]^2 / d^2 with psi the discordance rate.
    Evaluated with statsmodels' normal_power_het (std sqrt(psi) under H0, sqrt(psi - d^2) under d;
    quantiles from scipy.stats.norm) and solved for d with scipy's brentq. Returns 1.0 when n is too
    small to detect anything (n < ~4).
    """
    alpha = _check_confidence(confidence)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    sd0 = _stds(0.0, discordance)[0]

    def gap(d: float) -> float:
        return float(normal_power_het(d, n, alpha / 2, std_null=sd0, std_alternative=_stds(d, discordance)[1],
                                      alternative="larger")) - power

    hi = sd0 * (1 - 1e-9)  # d^2 < psi keeps the alternative's std positive
    if gap(hi) < 0:
        return 1.0
    return min(float(optimize.brentq(gap, 1e-12, hi)), 1.0)


# ---------------------------------------------------------------- promotion policy

@dataclass(frozen=True)
class PromotionPolicy:
    """When a candidate may take `champion` (defaults justified in docs/gates.md).

    confidence: level of the paired interval; the significance test runs at alpha = 1 - confidence.
    non_inferiority_margin: the regression (accuracy points, 0..1) the test set must rule out: the
        interval's lower bound must be above -margin. Also the effect rows_needed/power_check size for.
    min_improvement: smallest point gain worth a release, so a huge test set does not churn the
        champion for a real but negligible gain.
    """

    confidence: float = 0.95
    non_inferiority_margin: float = 0.02
    min_improvement: float = 0.01

    @classmethod
    def from_registry(cls, r) -> "PromotionPolicy":
        """The policy params.registry configures (run, promote, check and init all use this one)."""
        return cls(confidence=r.confidence, non_inferiority_margin=r.non_inferiority_margin,
                   min_improvement=r.min_improvement)

    def __post_init__(self) -> None:
        _check_confidence(self.confidence)
        if not 0.0 < self.non_inferiority_margin < 1.0:
            raise ValueError(f"non_inferiority_margin must be in (0, 1), got {self.non_inferiority_margin}")
        if not 0.0 <= self.min_improvement < 1.0:
            raise ValueError(f"min_improvement must be in [0, 1), got {self.min_improvement}")

    @property
    def alpha(self) -> float:
        return 1.0 - self.confidence


def _checks(policy: PromotionPolicy, res: dict) -> dict[str, NDArray[np.bool_]]:
    """The three promotion conditions, elementwise (scalars from decide, arrays from simulate).

    significant: exact McNemar (p < alpha, candidate ahead) is the binding test. It stays exact when
    discordant rows are few, where the percentile bootstrap is optimistic (e.g. 4-0 discordant on 100
    rows: bootstrap lower bound > 0, McNemar p = 0.125).
    """
    return {
        "non_inferior": np.asarray(res["ci_low"]) > -policy.non_inferiority_margin,
        "big_enough": np.asarray(res["diff"]) >= policy.min_improvement - _EPS,
        "significant": (np.asarray(res["diff"]) > 0) & (np.asarray(res["mcnemar_p"]) < policy.alpha),
    }


def _reason(policy: PromotionPolicy, cmp: dict, checks: dict[str, bool]) -> str:
    """One sentence: verdict, the numbers, and every condition that failed (or that all held)."""
    def pts(x: float) -> str:
        return f"{100 * x:+.1f}"

    head = (f"candidate {cmp['a_acc']:.1%} vs champion {cmp['b_acc']:.1%} on {cmp['n']} rows: "
            f"{pts(cmp['diff'])} points ({policy.confidence:.0%} CI {pts(cmp['ci_low'])} to {pts(cmp['ci_high'])}, "
            f"{cmp['b01']} rows only the candidate got right vs {cmp['b10']} only the champion, "
            f"exact McNemar p={cmp['mcnemar_p']:.3g})")
    why = {
        "significant": f"not significantly better (needs p < {policy.alpha:.3g} with the candidate ahead)",
        "big_enough": f"gain below the required {100 * policy.min_improvement:.1f} points",
        "non_inferior": f"could be {-100 * cmp['ci_low']:.1f} points worse, beyond the "
                        f"{100 * policy.non_inferiority_margin:.1f}-point non-inferiority margin",
    }
    failed = [why[k] for k in why if not checks[k]]
    if failed:
        return f"keep champion: {head}; " + "; ".join(failed) + "."
    return (f"promote: {head}; significantly better, at least {100 * policy.min_improvement:.1f} points "
            f"up and within the {100 * policy.non_inferiority_margin:.1f}-point non-inferiority margin.")


def decide(policy: PromotionPolicy, candidate_correct: ArrayLike, champion_correct: ArrayLike, seed: int = 0,
           *, n_boot: int = 10_000) -> dict:
    """Should the candidate take `champion`? Promote only if all three hold:

    1. non-inferior: paired interval lower bound of (candidate - champion) > -non_inferiority_margin;
    2. worth it: point difference >= min_improvement;
    3. not chance: exact McNemar p < 1 - confidence with the candidate ahead.
    Returns promote, reason (one sentence with the numbers), policy, and paired_compare's fields.
    """
    cmp = paired_compare(candidate_correct, champion_correct, confidence=policy.confidence, n_boot=n_boot,
                         seed=seed)
    checks = {k: bool(v) for k, v in _checks(policy, cmp).items()}
    return {"promote": all(checks.values()), "reason": _reason(policy, cmp, checks), **cmp,
            "policy": asdict(policy)}


def rows_needed(policy: PromotionPolicy, *, discordance: float = 0.10, regression: float = 0.02,
                power: float = 0.8) -> int:
    """Test rows needed to tell a `regression`-point difference with `power` at the policy's alpha.

    Connor (1987) via statsmodels' normal_sample_size_one_tail (one tail at alpha/2 of the two-sided
    level, as the policy uses). A difference cannot exceed the discordance rate, hence the check.
    """
    if not 0.0 < regression <= discordance:
        raise ValueError(f"regression must be in (0, discordance={discordance}], got {regression}")
    sd0, sd1 = _stds(regression, discordance)
    n = normal_sample_size_one_tail(regression, power, policy.alpha / 2, std_null=sd0, std_alternative=sd1)
    return int(math.ceil(float(n)))


def power_check(policy: PromotionPolicy, n: int, discordance: float = 0.10) -> str | None:
    """One line when an n-row test set cannot support the policy, else None.

    "Support" = it can tell a difference the size of the non-inferiority margin with 80% power at the
    assumed discordance (share of rows where candidate and champion disagree; 0.10 unless measured).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    margin = policy.non_inferiority_margin
    need = rows_needed(policy, discordance=discordance, regression=min(margin, discordance))
    if n >= need:
        return None
    floor = max(min_detectable_diff(n, discordance=discordance, confidence=policy.confidence), policy.min_improvement)
    return (f"test set has {n} rows: the policy can only promote a candidate >= {100 * floor:.1f} points better "
            f"and cannot tell a {100 * margin:g}-point regression; ~{need} rows needed "
            f"(at {discordance:.0%} discordance, 80% power)")


# ---------------------------------------------------------------- simulation

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


def _decide_many(policy: PromotionPolicy, cand: NDArray[np.bool_], champ: NDArray[np.bool_], *, seed: int,
                 n_boot: int) -> NDArray[np.bool_]:
    """decide(policy, cand[i], champ[i], seed, n_boot=n_boot)["promote"] for every draw i, vectorised."""
    res = _compare_many(cand, champ, confidence=policy.confidence, n_boot=n_boot, seed=seed)
    c = _checks(policy, res)
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


def _main() -> None:
    """Print the simulation table of docs/gates.md: python -m tasks.stats"""
    policy, diffs = PromotionPolicy(), (-0.05, -0.02, 0.0, 0.02, 0.05)
    print(f"policy {policy}; champion 0.70, discordance 0.10, 2000 draws per cell")
    print("| n | " + " | ".join(f"{100 * d:+.0f} pts" for d in diffs) + " | old rule (cand > champ), equal |")
    print("|---" * (len(diffs) + 2) + "|")
    for n in (100, 500, 2000):
        rates = [simulate(policy, n, d, draws=2000, seed=n) for d in diffs]
        cand, champ = synthetic_pairs(n, 0.0, draws=2000, seed=n)
        old = float((cand.mean(axis=1) > champ.mean(axis=1)).mean())
        print(f"| {n} | " + " | ".join(f"{r:.1%}" for r in rates) + f" | {old:.1%} |")
    for n in (107, 500, 2000):
        print(f"power_check(n={n}): {power_check(policy, n)}")


if __name__ == "__main__":
    _main()
