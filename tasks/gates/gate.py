"""Gate stage: thresholds from params, one verdict per gate, each with its numbers AND its interval.

Every comparison is paired on the saved per-row scores of one metric (the same test rows for every
model), through tasks.gates.paired: the difference, a seeded paired-bootstrap interval, the paired test (exact
McNemar for 0/1 scores, sign-flip permutation for continuous ones). Numbers are in the metric's units and
oriented so that + is better (nll: lower is better, so its "gain" is a reduction). Pre-merge gates decide
whether merging is worth doing at all; the merge gate re-checks the merged model against the QLoRA model it
came from, row by row (so changes in both directions cannot cancel). Nothing is registered unless every
gate passed.

What each gate decides on (docs/gates.md says why):
- gain_over_base     interval lower bound of the gain QLoRA - base                   >= gates.min_gain_over_base
- retention_vs_lora  (QLoRA - base) / (LoRA - base), point; LoRA no better than base -> FAIL; 0 = gate off
                                                                                    >= gates.min_retention_vs_lora
- merge_disagreement 0/1 metric: share of rows whose normalised answers differ;
                     continuous: mean |merged - QLoRA| per-row score                <= gates.max_merge_disagreement
- <suite>:gain / <suite>:non_inferior   interval lower bound of the gain cand - base >= threshold / > -margin
"""
from __future__ import annotations

from collections.abc import Sequence

from qlora_ops.tasks.gates import paired
from qlora_ops.tasks.core.config import GateParams, Params
from qlora_ops.tasks.metrics import Metric, get, normalize

_OPS = {">=": lambda x, t: x >= t, ">": lambda x, t: x > t, "<=": lambda x, t: x <= t}
_NOT = {">=": "<", ">": "<=", "<=": ">"}


def _verdict(name: str, value: float, op: str, threshold: float, detail: str, *, metric: Metric, confidence: float,
             ci: tuple[float, float] | None = None, decided_on: float | None = None, p_value: float | None = None,
             ci_of: str = "value", suite: str | None = None, fail: str | None = None,
             waived: str | None = None) -> dict:
    """One gate's verdict. `fail` forces FAIL with that reason as what it was decided on (no number can pass);
    `waived` passes it with that reason (the params turned the gate off; the numbers are still reported)."""
    x = value if decided_on is None else decided_on
    ok = fail is None and (waived is not None or _OPS[op](x, threshold))
    how = fail or waived or ("interval lower bound" if decided_on is not None else "point estimate")
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
    verdicts = [_verdict(
        "gain_over_base", gain["gain"], ">=", g.min_gain_over_base,
        f"{name} {q:.4f} - base {b:.4f} = {_num(m, gain['gain'])}{_better(m)}, {conf} CI "
        f"{_ci(m, gain['gain_low'], gain['gain_high'])}, {_test(gain)}; decided on the lower bound",
        ci=(gain["gain_low"], gain["gain_high"]), decided_on=gain["gain_low"], p_value=gain["p_value"], **common)]
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
    else:
        value = gain["gain"] / lora_gain
        why = f"(QLoRA {q:.4f} - base {b:.4f}) / (LoRA {l:.4f} - base {b:.4f}) = {value:.4f} of LoRA's gain kept; "
    verdicts.append(_verdict(
        "retention_vs_lora", value, ">=", g.min_retention_vs_lora,
        why + ("not required (gates.min_retention_vs_lora = 0); " if off else "") + beside,
        ci=(ret["gain_low"], ret["gain_high"]), p_value=ret["p_value"], ci_of=of,
        fail="LoRA gain over base <= 0" if lora_gain <= 0 and not off else None,
        waived="not required (gates.min_retention_vs_lora = 0)" if off else None, **common))
    return verdicts


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
        return _verdict("merge_disagreement", a["share"], "<=", g.max_merge_disagreement, answers,
                        ci=(a["ci_low"], a["ci_high"]), metric=m, confidence=g.confidence)
    d = paired.mean_abs_diff(merged_scores, qlora_scores, confidence=g.confidence, seed=seed)
    return _verdict("merge_disagreement", d["value"], "<=", g.max_merge_disagreement,
                    f"mean |merged - QLoRA| {m.name} per row = {d['value']:.4f}, {conf} CI [{d['ci_low']:.4f}, "
                    f"{d['ci_high']:.4f}]; {answers}",
                    ci=(d["ci_low"], d["ci_high"]), metric=m, confidence=g.confidence)


def suite_gate(suite: str, role: str, metric: Metric | str, base_scores: Sequence[float],
               cand_scores: Sequence[float], *, threshold: float, confidence: float, seed: int = 0) -> dict:
    """One extra suite's gate, candidate vs base on that suite's rows, decided on the interval's lower bound
    of the gain (metric's direction). role "gain": lower bound >= threshold (the minimum gain); role
    "non_inferior": lower bound > -threshold (threshold = the margin it may lose: the forgetting guard).
    Suites with role "report" have no gate. The verdict is named f"{suite}:{role}"."""
    if role not in ("gain", "non_inferior"):
        raise ValueError(f"suite {suite!r}: role {role!r} has no gate; gate roles are 'gain' and 'non_inferior' "
                         "('report' suites are only shown)")
    if role == "non_inferior" and threshold < 0:
        raise ValueError(f"suite {suite!r}: a non_inferior margin must be >= 0, got {threshold}")
    m = _metric(metric)
    c = _gain(m, cand_scores, base_scores, confidence, seed)
    bound, op = (threshold, ">=") if role == "gain" else (-threshold, ">")
    what = (f"must gain at least {_num(m, threshold)}" if role == "gain"
            else f"must not lose more than {_num(m, threshold).lstrip('+')} (non-inferiority margin)")
    return _verdict(f"{suite}:{role}", c["gain"], op, bound,
                    f"suite {suite!r} ({m.name}, {c['n']} rows) {what}: candidate {c['a_mean']:.4f} vs base "
                    f"{c['b_mean']:.4f} = {_num(m, c['gain'])}{_better(m)}, {level(confidence)} CI "
                    f"{_ci(m, c['gain_low'], c['gain_high'])}, {_test(c)}; decided on the lower bound",
                    ci=(c["gain_low"], c["gain_high"]), decided_on=c["gain_low"], p_value=c["p_value"],
                    metric=m, confidence=confidence, suite=suite)


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
        if v["decided_on"] not in ("interval lower bound", "point estimate"):
            return f"{v['name']}: {v['decided_on']} ({v['detail']})"
        x = v["ci_low"] if v["decided_on"] == "interval lower bound" else v["value"]
        return f"{v['name']}: {v['decided_on']} {x} {_NOT[v['op']]} required {v['threshold']} ({v['detail']})"
    return "; ".join(why(v) for v in verdicts if not v["passed"]) or "all gates passed"
