"""Is a test set big enough for the configured gates? Refused before training (`check` and `run`), naming
the rows needed, where no outcome could ever pass a gate or a suite's margin could not be told.

Three floors, at alpha = 1 - gates.confidence (docs/gates.md, "Too few rows"):
- a gate that claims a gain (threshold >= 0: gain_over_base, retention, a `gain` suite) passes only when the
  paired test rejects; even with every row in the candidate's favour, exact McNemar and the exact sign-flip
  test give p = 2 / 2^n, so n must reach the smallest n with 2 / 2^n < alpha (6 rows at 95%);
- the merge gate on a 0/1 metric decides on the Clopper-Pearson upper bound, which is 1 - (alpha/2)^(1/n) even
  with 0 differing rows: it reaches max_merge_disagreement only from ln(alpha/2) / ln(1 - max) rows;
- a `non_inferior` suite with margin m > 0 must tell a loss of m with 80% power (tasks.gates.policy.rows_needed
  at the assumed noise: ASSUMED_DISCORDANCE for 0/1 scores, ASSUMED_SD for 0..1 continuous ones; a margin
  above the assumed discordance is sized at the discordance, the largest loss those rows allow).
"""
from __future__ import annotations

import math

from qlora_ops.tasks.core.config import Params, ParamsError
from qlora_ops.tasks.gates.paired import ASSUMED_DISCORDANCE, ASSUMED_SD, level
from qlora_ops.tasks.gates.policy import PromotionPolicy, rows_needed
from qlora_ops.tasks.metrics import get

__all__ = ["merge_floor", "problems", "refuse_small", "test_floor"]


def test_floor(confidence: float) -> int:
    """Fewest rows on which an exact paired test can reject at alpha = 1 - confidence (p = 2 / 2^n at best)."""
    return math.floor(math.log2(2 / (1 - confidence))) + 1


def merge_floor(max_share: float, confidence: float) -> float:
    """Fewest rows on which 0 differing rows give a Clopper-Pearson upper bound <= max_share (inf: never)."""
    if max_share >= 1:
        return 0
    if max_share <= 0:
        return math.inf
    return math.ceil(math.log((1 - confidence) / 2) / math.log(1 - max_share) - 1e-9)


def _margin_rows(metric: str, margin: float, confidence: float) -> int | None:
    """Rows to tell a loss of `margin` with 80% power at the assumed noise; None where nothing is assumed
    (metrics not on a 0..1 scale: nll)."""
    m = get(metric)
    if margin <= 0 or m.hi > 1:
        return None
    pol = PromotionPolicy(confidence=confidence)
    if m.binary:
        return rows_needed(pol, discordance=ASSUMED_DISCORDANCE, regression=min(margin, ASSUMED_DISCORDANCE))
    return rows_needed(pol, sd=ASSUMED_SD, regression=margin)


def problems(params: Params, n_test: int, suite_rows: dict[str, int | None]) -> list[str]:
    """One line per gate the rows cannot support, naming the key, the rows there are and the rows needed.
    `suite_rows`: each suite's row count after its max_examples (None: unknown before evaluation)."""
    g, conf = params.gates, params.gates.confidence
    at = f"at gates.confidence {level(conf)}"
    out = []
    floor = test_floor(conf)
    claims = [k for k, on in (("min_gain_over_base", g.min_gain_over_base >= 0),
                              ("min_retention_vs_lora", g.min_retention_vs_lora > 0)) if on]
    if claims and n_test < floor:
        out.append(f"gates.{' and gates.'.join(claims)}: the test split has {n_test} rows; no paired test can reject "
                   f"on fewer than {floor} ({at}), so no candidate could ever pass")
    if get(params.eval.metric).binary:
        need = merge_floor(g.max_merge_disagreement, conf)
        if n_test < need:
            why = ("0 can never pass: the upper bound is above 0 on any rows; set it above 0"
                   if math.isinf(need) else f"the merge gate needs >= {need} rows (0 differing rows give a "
                   f"Clopper-Pearson upper bound <= {g.max_merge_disagreement:g} {at} only from {need} rows)")
            out.append(f"gates.max_merge_disagreement={g.max_merge_disagreement:g}: the test split has {n_test} rows; {why}")
    for i, s in enumerate(params.eval.suites):
        n = suite_rows.get(s.name)
        if n is None or s.role == "report":
            continue
        key = f"eval.suites[{i}] ({s.name})"
        if s.role == "gain" and s.threshold >= 0 and n < floor:
            out.append(f"{key}: role gain on {n} rows; no paired test can reject on fewer than {floor} ({at})")
        need = _margin_rows(s.metric, s.threshold, conf) if s.role == "non_inferior" else None
        if need is not None and n < need:
            out.append(f"{key}: a non_inferior margin of {s.threshold:g} {s.metric} needs ~{need} rows to be told "
                       f"with 80% power {at} (assumed noise, docs/gates.md); the suite has {n}")
    return out


def refuse_small(params: Params, n_test: int, suite_rows: dict[str, int | None], where: str) -> None:
    """ParamsError (exit 2) listing every gate these rows cannot support, and the fixes."""
    if bad := problems(params, n_test, suite_rows):
        raise ParamsError(f"{where}: test set too small for the configured gates:\n  " + "\n  ".join(bad)
                          + "\n  fix: more rows (data, eval.max_examples, a suite's max_examples), or gates/margins "
                            "these rows can support")
