"""Simulation of the promotion policy against a known truth: the tables of docs/gates.md.

Synthetic paired data where the true difference is set (0/1 scores: synthetic_pairs; ROUGE-L-shaped
continuous scores: synthetic_scores), run through the real decision (tasks.gates.policy._decide_many,
which the tests check equals decide draw for draw) to measure promotion rates per decision and over a
year of weekly decisions. `python -m qlora_ops.tasks.gates.simulate` prints the tables (several minutes);
tests/code/test_stats.py asserts the targets with smaller draws.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import integrate, optimize, special, stats

from qlora_ops.tasks.gates.paired import ASSUMED_SD, SIGNFLIP, _compare_many, passes_gain
from qlora_ops.tasks.gates.policy import PromotionPolicy, _decide_many, power_check

__all__ = ["simulate", "simulate_gate", "simulate_scores", "simulate_year", "synthetic_pairs", "synthetic_scores"]


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


# ---------------------------------------------------------------- the gates' rule (docs/gates.md, "One rule")

def simulate_gate(n: int, true_diff: float, *, binary: bool, threshold: float = 0.0, confidence: float = 0.95,
                  draws: int = 1000, seed: int = 0, n_boot: int = 1000, n_perm: int = 1000,
                  old: bool = False) -> float:
    """Share of draws on which a gain gate (tasks.gates.gate: suite gain, gain_over_base) passes a candidate
    truly `true_diff` better than its reference: 0/1 scores (synthetic_pairs) or ROUGE-L-shaped ones
    (synthetic_scores). The rule is paired.passes_gain, the one the gates call; old=True: the lower bound
    alone (the rule before issue 26)."""
    if binary:
        cand, ref = synthetic_pairs(n, true_diff, draws=draws, seed=seed)
    else:
        cand, ref = synthetic_scores(n, true_diff, draws=draws, seed=seed)
    res = _compare_many(cand, ref, confidence=confidence, n_boot=n_boot, seed=seed + 1, binary=binary, n_perm=n_perm)
    if old:
        return float((res["ci_low"] >= threshold).mean())
    return float(passes_gain(res["diff"], res["ci_low"], res["p_value"], threshold, confidence).mean())


def gate_table(draws: int = 2000, sizes: tuple[int, ...] = (100, 300, 1000)) -> str:
    """docs/gates.md's table of the gates' rule: an equal candidate's pass rate and the power at +5 points,
    0/1 and ROUGE-L-shaped scores, gain gate at threshold 0 (the strictest "must be better")."""
    out = [f"gain gate, threshold 0, 95%: pass rate over {draws} draws per cell (new rule: test AND lower bound; "
           "old: lower bound alone)",
           "| n | 0/1 equal: new | old | 0/1 +5 pts: new | old | ROUGE-L equal: new | old | ROUGE-L +0.05: new | old |",
           "|---" * 9 + "|"]
    for n in sizes:
        cells = [simulate_gate(n, d, binary=b, draws=draws, seed=n, old=o)
                 for b in (True, False) for d in (0.0, 0.05) for o in (False, True)]
        out.append(f"| {n} | " + " | ".join(f"{c:.1%}" for c in cells) + " |")
    return "\n".join(out)


# ---------------------------------------------------------------- the tables of docs/gates.md

def _main() -> None:
    """Print the simulation tables of docs/gates.md: python -m qlora_ops.tasks.gates.simulate"""
    print(gate_table())
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
    import sys

    print(gate_table()) if sys.argv[1:] == ["--gates"] else _main()
