"""Gate stage: thresholds from params, one verdict per gate, each with its numbers AND its interval.

Every comparison is paired on the saved per-row scores of one metric (the same test rows for every
model), through tasks.gates.paired: the difference, a seeded paired-bootstrap interval, the paired test (exact
McNemar for 0/1 scores, sign-flip permutation for continuous ones). Numbers are in the metric's units and
oriented so that + is better (nll: lower is better, so its "gain" is a reduction). Pre-merge gates decide
whether merging is worth doing at all; the merge gate re-checks the merged model against the QLoRA model it
came from, row by row (so changes in both directions cannot cancel). Nothing is registered unless every
gate passed.

What each gate decides on (docs/gates.md, "One rule", says why). alpha = 1 - gates.confidence; every interval
is two-sided at gates.confidence, so each bound is a one-sided test at alpha / 2:
- gain_over_base     the paired test rejects "no difference" (p < alpha, QLoRA ahead) AND the interval's lower
                     bound of the gain QLoRA - base                                  >= gates.min_gain_over_base
- retention_vs_lora  (QLoRA - base) / (LoRA - base): the sign-flip test of the per-row (QLoRA - base) - r (LoRA -
                     base) rejects (p < alpha, ahead) AND the ratio's own bootstrap lower bound
                                                                                    >= r = gates.min_retention_vs_lora
                     LoRA no better than base -> FAIL; r = 0 = gate off
- merge_disagreement the interval's UPPER bound of: 0/1 metric: the share of rows whose normalised answers differ
                     (Clopper-Pearson); continuous: mean |merged - QLoRA| per-row score (bootstrap)
                                                                                    <= gates.max_merge_disagreement
- <suite>:gain          as gain_over_base, candidate vs base on the suite's rows      >= threshold (0: must be better)
- <suite>:non_inferior  interval lower bound of the gain candidate - base             >= -margin (0: may lose nothing;
                        an identical model passes); with a champion also candidate vs champion
                        (<suite>:non_inferior_vs_champion), which promotion requires
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qlora_ops.tasks.gates import paired
from qlora_ops.tasks.core.config import GateParams, Params
from qlora_ops.tasks.metrics import Metric, get, normalize

_OPS = {">=": lambda x, t: x >= t, ">": lambda x, t: x > t, "<=": lambda x, t: x <= t}
_NOT = {">=": "<", ">": "<=", "<=": ">"}


# What a verdict was decided on (explain() prints the bound it names).
TEST_AND_LOW = "test and interval lower bound"
LOW = "interval lower bound"
HIGH = "interval upper bound"


def _verdict(name: str, value: float, op: str, threshold: float, detail: str, *, metric: Metric, confidence: float,
             ci: tuple[float, float] | None = None, decided_on: float | None = None, p_value: float | None = None,
             ci_of: str = "value", suite: str | None = None, fail: str | None = None,
             waived: str | None = None, ok: bool | None = None, how: str | None = None) -> dict:
    """One gate's verdict. `ok`/`how`: decided by the gate's rule (tasks.gates.paired.passes_gain or a bound);
    else on `decided_on` (a bound) or the point value against the threshold. `fail` forces FAIL with that reason
    as what it was decided on (no number can pass); `waived` passes it with that reason (the params turned the
    gate off; the numbers are still reported)."""
    x = value if decided_on is None else decided_on
    rule = bool(ok) if ok is not None else _OPS[op](x, threshold)
    ok = fail is None and (waived is not None or rule)
    how = fail or waived or how or (LOW if decided_on is not None else "point estimate")
    return {"name": name, "value": round(value, 6), "op": op, "threshold": threshold, "passed": bool(ok),
            "detail": detail, "ci_low": None if ci is None else round(ci[0], 6),
            "ci_high": None if ci is None else round(ci[1], 6), "ci_of": ci_of, "p_value": p_value,
            "decided_on": how, "metric": metric.name, "suite": suite, "confidence": confidence}


def _metric(metric: Metric | str) -> Metric:
    return get(metric) if isinstance(metric, str) else metric


def _gain(metric: Metric, cand: Sequence[float], ref: Sequence[float], confidence: float, seed: int) -> dict:
    """paired_compare(cand, ref) plus the gain oriented so + is better, and its interval."""
    c = paired.paired_compare(cand, ref, higher_is_better=metric.higher_is_better, binary=metric.binary,
                             confidence=confidence, seed=seed)
    s = 1.0 if metric.higher_is_better else -1.0
    lo, hi = sorted((s * c["ci_low"], s * c["ci_high"]))
    return {**c, "gain": s * c["diff"], "gain_low": lo, "gain_high": hi}


def _num(metric: Metric, x: float) -> str:
    """A signed difference as people read it: points for a 0/1 metric, metric units otherwise."""
    return f"{100 * x:+.1f} pts" if metric.binary else f"{x:+.4f}"


def _ci(m: Metric, lo: float, hi: float) -> str:
    return f"[{100 * lo:+.1f}, {100 * hi:+.1f}]" if m.binary else f"[{lo:+.4f}, {hi:+.4f}]"


def _test(c: dict) -> str:
    return f"McNemar p={c['p_value']:.3g}" if c["test"] == paired.MCNEMAR else f"{c['test']} p={c['p_value']:.3g}"


def _better(metric: Metric) -> str:
    return "" if metric.higher_is_better else f" ({metric.name}: lower is better, gains are reductions)"


def pre_merge_gates(g: GateParams, metric: Metric | str, base: Sequence[float], lora: Sequence[float],
                    qlora: Sequence[float], seed: int = 0) -> list[dict]:
    """Per-row scores (the gate metric's) of base, LoRA and QLoRA on the same test rows, in the same order."""
    m = _metric(metric)
    conf = level(g.confidence)
    gain = _gain(m, qlora, base, g.confidence, seed)
    ret = _gain(m, qlora, lora, g.confidence, seed)  # QLoRA vs LoRA, for the interval beside retention
    q, l, b = ret["a_mean"], ret["b_mean"], gain["b_mean"]
    lora_gain = (l - b) if m.higher_is_better else (b - l)
    common = {"metric": m, "confidence": g.confidence}
    name = "QLoRA" if m.binary and m.name == "exact_match" else f"QLoRA {m.name}"
    bar, bar_why = gain_bar(g, m, b)
    verdicts = [_verdict(
        "gain_over_base", gain["gain"], ">=", bar,
        f"{name} {q:.4f} - base {b:.4f} = {_num(m, gain['gain'])}{_better(m)}, {conf} CI "
        f"{_ci(m, gain['gain_low'], gain['gain_high'])}, {_test(gain)}; {_RULE}{bar_why}",
        ci=(gain["gain_low"], gain["gain_high"]), decided_on=gain["gain_low"], p_value=gain["p_value"],
        ok=_passes(gain, bar, g.confidence), how=TEST_AND_LOW, **common)]
    beside = f"QLoRA vs LoRA {_num(m, ret['gain'])}, {conf} CI {_ci(m, ret['gain_low'], ret['gain_high'])}, {_test(ret)}"
    of = "QLoRA - LoRA" if m.higher_is_better else "LoRA - QLoRA"
    # min_retention_vs_lora = 0 turns the gate off (reported, never refusing): the tests' untrained tiny models.
    off = g.min_retention_vs_lora <= 0
    if lora_gain <= 0:
        # No gain to retain: the ratio is undefined, and QLoRA cannot be checked against a baseline that
        # learned nothing. FAIL (whatever the ratio would say), named, unless the gate is off.
        value, why = 0.0, (f"LoRA {l:.4f} is no better than base {b:.4f} (gain {_num(m, lora_gain)}): the baseline "
                           "learned nothing, so there is no gain for QLoRA to retain and QLoRA cannot be checked "
                           "against it; " + ("" if off else "fix the training (data, steps, lr) before trusting "
                                                            "either model; "))
        return verdicts + [_verdict(
            "retention_vs_lora", value, ">=", g.min_retention_vs_lora,
            why + ("not required (gates.min_retention_vs_lora = 0); " if off else "") + beside,
            ci=(ret["gain_low"], ret["gain_high"]), p_value=ret["p_value"], ci_of=of,
            fail=None if off else "LoRA gain over base <= 0",
            waived="not required (gates.min_retention_vs_lora = 0)" if off else None, **common)]
    value = gain["gain"] / lora_gain
    r = _retention(m, base, lora, qlora, g, seed)
    why = (f"(QLoRA {q:.4f} - base {b:.4f}) / (LoRA {l:.4f} - base {b:.4f}) = {value:.4f} of LoRA's gain kept, "
           f"{conf} CI [{r['low']:.4f}, {r['high']:.4f}] (paired bootstrap of the ratio), sign-flip p={r['p']:.3g} "
           f"against keeping {g.min_retention_vs_lora:g}; ")
    verdicts.append(_verdict(
        "retention_vs_lora", value, ">=", g.min_retention_vs_lora,
        why + ("not required (gates.min_retention_vs_lora = 0); " if off else "") + beside,
        ci=(r["low"], r["high"]), decided_on=r["low"], p_value=r["p"], ok=r["ok"], how=TEST_AND_LOW,
        waived="not required (gates.min_retention_vs_lora = 0)" if off else None, **common))
    return verdicts


def gain_bar(g: GateParams, m: Metric, base_mean: float) -> tuple[float, str]:
    """The gain gate's threshold: gates.min_gain_over_base, or min_gain_of_headroom of the base's measured
    headroom where that is lower (a base already near the metric's best leaves less than the fixed bar)."""
    if g.min_gain_of_headroom is None or g.min_gain_over_base <= 0 or m.hi == float("inf"):
        return g.min_gain_over_base, ""
    best = m.hi if m.higher_is_better else m.lo
    headroom = abs(best - base_mean)
    rel = round(g.min_gain_of_headroom * headroom, 6)
    if rel >= g.min_gain_over_base:
        return g.min_gain_over_base, ""
    return rel, (f"; bar {rel:g} = {g.min_gain_of_headroom:g} of the base's headroom {headroom:.4f} (below the fixed "
                 f"{g.min_gain_over_base:g}: the base already scores {base_mean:.4f})")


_RULE = "passes only if the test rejects AND the lower bound clears the threshold"


def _passes(c: dict, threshold: float, confidence: float) -> bool:
    return bool(paired.passes_gain(c["gain"], c["gain_low"], c["p_value"], threshold, confidence))


def _retention(m: Metric, base, lora, qlora, g: GateParams, seed: int) -> dict:
    """Retention's own test and interval. Per row, QLoRA's gain over the base gq and LoRA's gl (metric's
    direction); H0: mean(gq) <= r mean(gl). Test: sign-flip on gq - r gl (candidate ahead, p < alpha);
    interval: paired bootstrap of mean(gq) / mean(gl)."""
    sgn = 1.0 if m.higher_is_better else -1.0
    b, l, q = (np.asarray(x, dtype=np.float64) for x in (base, lora, qlora))
    gq, gl = sgn * (q - b), sgn * (l - b)
    r = g.min_retention_vs_lora
    e = gq - r * gl
    p = paired.signflip_p(e, seed=seed)
    low, high = paired.ratio_interval(gq, gl, confidence=g.confidence, seed=seed)
    ok = bool(e.mean() > 0 and p < 1 - g.confidence and low >= r - paired.EPS)
    return {"p": p, "low": low, "high": high, "ok": ok}


def _normalise(answer: str) -> str:
    """exact_match's own answer normalisation (case, quotes, trailing period): answers that score the same
    count as the same answer (tasks.metrics.normalize loads its evaluate module on first use)."""
    return normalize(answer)


def merge_gate(g: GateParams, metric: Metric | str, qlora_scores: Sequence[float], merged_scores: Sequence[float],
               qlora_answers: Sequence[str], merged_answers: Sequence[str], seed: int = 0) -> dict:
    """Merged vs the QLoRA model it came from, on the same rows. 0/1 metric: share of rows whose normalised
    answers differ (Clopper-Pearson interval). Continuous: mean |merged - QLoRA| per-row score (bootstrap
    interval), with the share of differing normalised answers reported beside it."""
    m = _metric(metric)
    conf = level(g.confidence)
    a = paired.agreement(merged_answers, qlora_answers, confidence=g.confidence, normalize=_normalise)
    answers = (f"merged and QLoRA answer differently (normalised) on {a['differ']}/{a['n']} rows, {conf} CI "
               f"[{a['ci_low']:.3f}, {a['ci_high']:.3f}]")
    if m.binary:
        return _verdict("merge_disagreement", a["share"], "<=", g.max_merge_disagreement,
                        answers + "; decided on the upper bound (Clopper-Pearson)",
                        ci=(a["ci_low"], a["ci_high"]), decided_on=a["ci_high"], how=HIGH, metric=m,
                        confidence=g.confidence)
    d = paired.mean_abs_diff(merged_scores, qlora_scores, confidence=g.confidence, seed=seed)
    return _verdict("merge_disagreement", d["value"], "<=", g.max_merge_disagreement,
                    f"mean |merged - QLoRA| {m.name} per row = {d['value']:.4f}, {conf} CI [{d['ci_low']:.4f}, "
                    f"{d['ci_high']:.4f}]; {answers}; decided on the upper bound",
                    ci=(d["ci_low"], d["ci_high"]), decided_on=d["ci_high"], how=HIGH, metric=m, confidence=g.confidence)


def suite_gate(suite: str, role: str, metric: Metric | str, base_scores: Sequence[float],
               cand_scores: Sequence[float], *, threshold: float, confidence: float, seed: int = 0,
               ref: str = "base") -> dict:
    """One extra suite's gate, candidate vs `ref` (the base, or the champion) on that suite's rows. role
    "gain": the paired test rejects with the candidate ahead AND the interval's lower bound of the gain >=
    threshold (0: must be significantly better, an identical model fails). role "non_inferior": the lower
    bound >= -threshold (threshold = the margin it may lose: the forgetting guard; that bound is the one-sided
    test of "worse by more than the margin" at (1 - confidence) / 2; margin 0: may lose nothing, an identical
    model, whose interval is [0, 0], passes). Suites with role "report" have no gate. Named f"{suite}:{role}",
    plus "_vs_champion" against the champion."""
    if role not in ("gain", "non_inferior"):
        raise ValueError(f"suite {suite!r}: role {role!r} has no gate; gate roles are 'gain' and 'non_inferior' "
                         "('report' suites are only shown)")
    if role == "non_inferior" and threshold < 0:
        raise ValueError(f"suite {suite!r}: a non_inferior margin must be >= 0, got {threshold}")
    m = _metric(metric)
    c = _gain(m, cand_scores, base_scores, confidence, seed)
    if role == "gain":
        bound, op, ok, how, rule = threshold, ">=", _passes(c, threshold, confidence), TEST_AND_LOW, _RULE
        what = f"must gain at least {_num(m, threshold)} and significantly"
    else:
        bound, op, how, rule = -threshold, ">=", LOW, "decided on the lower bound"
        ok = c["gain_low"] >= -threshold - paired.EPS
        what = f"must not lose more than {_num(m, threshold).lstrip('+')} (non-inferiority margin)"
    return _verdict(f"{suite}:{role}" + ("" if ref == "base" else f"_vs_{ref}"), c["gain"], op, bound,
                    f"suite {suite!r} ({m.name}, {c['n']} rows) {what}: candidate {c['a_mean']:.4f} vs {ref} "
                    f"{c['b_mean']:.4f} = {_num(m, c['gain'])}{_better(m)}, {level(confidence)} CI "
                    f"{_ci(m, c['gain_low'], c['gain_high'])}, {_test(c)}; {rule}",
                    ci=(c["gain_low"], c["gain_high"]), decided_on=c["gain_low"], p_value=c["p_value"],
                    ok=ok, how=how, metric=m, confidence=confidence, suite=suite)


def level(confidence: float) -> str:
    return paired.level(confidence)


def gate_metric(params: Params) -> Metric:
    """The domain split's gate metric (eval.metric)."""
    return get(params.eval.metric)


def gate_scores(model_rows: dict, metric: Metric) -> list:
    """One model's per-row scores of `metric` from tasks.evaluate.predict.per_row's dict (its 0/1 `correct` when no
    per-metric scores were saved: exact match)."""
    scores = model_rows.get("scores") or {}
    if metric.name in scores:
        return scores[metric.name]
    if metric.name != "exact_match":
        have = sorted(scores) or "exact match only"
        raise ValueError(f"no per-row {metric.name} scores in these results (have: {have})")
    return model_rows["correct"]


def passed(verdicts: list[dict]) -> bool:
    return bool(verdicts) and all(v["passed"] for v in verdicts)


def explain(verdicts: list[dict]) -> str:
    def why(v: dict) -> str:
        how = v["decided_on"]
        if how == TEST_AND_LOW:
            return (f"{v['name']}: needs p < {1 - v['confidence']:.3g} (got {v['p_value']:.3g}) and lower bound "
                    f"{v['ci_low']} >= {v['threshold']} ({v['detail']})")
        if how in (LOW, HIGH, "point estimate"):
            x = {LOW: v["ci_low"], HIGH: v["ci_high"]}.get(how, v["value"])
            return f"{v['name']}: {how} {x} {_NOT[v['op']]} required {v['threshold']} ({v['detail']})"
        return f"{v['name']}: {how} ({v['detail']})"
    return "; ".join(why(v) for v in verdicts if not v["passed"]) or "all gates passed"
