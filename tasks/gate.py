"""Gate stage: thresholds from params, one verdict per gate, each with its numbers AND its interval.

Every comparison is paired on the saved per-row predictions (the same test rows for every model),
through tasks.stats: the difference, a seeded paired-bootstrap interval, the exact McNemar p-value.
Pre-merge gates decide whether merging is worth doing at all; the merge gate re-checks the merged model
against the QLoRA model it came from, on answers rather than net accuracy (so flips in both directions
cannot cancel). Nothing is registered unless every gate passed.

What each gate decides on (docs/gates.md says why):
- gain_over_base     the interval's lower bound of QLoRA - base      >= gates.min_gain_over_base
- retention_vs_lora  QLoRA / LoRA accuracy (point; interval reported) >= gates.min_retention_vs_lora
- merge_disagreement share of rows where merged and QLoRA differ    <= gates.max_merge_disagreement
"""
from __future__ import annotations

from tasks import stats
from tasks.config import GateParams


def _verdict(name: str, value: float, op: str, threshold: float, detail: str, *, ci: tuple[float, float] | None = None,
             decided_on: float | None = None, p_value: float | None = None, ci_of: str = "value") -> dict:
    x = value if decided_on is None else decided_on
    ok = x >= threshold if op == ">=" else x <= threshold
    return {"name": name, "value": round(value, 6), "op": op, "threshold": threshold, "passed": bool(ok),
            "detail": detail, "ci_low": None if ci is None else round(ci[0], 6),
            "ci_high": None if ci is None else round(ci[1], 6), "ci_of": ci_of, "p_value": p_value,
            "decided_on": "interval lower bound" if decided_on is not None else "point estimate"}


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def pre_merge_gates(g: GateParams, base: list[bool], lora: list[bool], qlora: list[bool], seed: int = 0) -> list[dict]:
    """Per-row correctness of base, LoRA and QLoRA on the same test rows, in the same order."""
    gain = stats.paired_compare(qlora, base, confidence=g.confidence, seed=seed)
    ret = stats.paired_compare(qlora, lora, confidence=g.confidence, seed=seed)
    q, l = ret["a_acc"], ret["b_acc"]
    retention = q / l if l > 0 else (1.0 if q >= l else 0.0)
    ci = f"{g.confidence:.0%} CI"
    return [
        _verdict("gain_over_base", gain["diff"], ">=", g.min_gain_over_base,
                 f"QLoRA {q:.4f} - base {gain['b_acc']:.4f} = {_pts(gain['diff'])} pts, {ci} "
                 f"[{_pts(gain['ci_low'])}, {_pts(gain['ci_high'])}], McNemar p={gain['mcnemar_p']:.3g}; "
                 f"decided on the lower bound",
                 ci=(gain["ci_low"], gain["ci_high"]), decided_on=gain["ci_low"], p_value=gain["mcnemar_p"]),
        _verdict("retention_vs_lora", retention, ">=", g.min_retention_vs_lora,
                 f"QLoRA {q:.4f} / LoRA {l:.4f}; QLoRA - LoRA = {_pts(ret['diff'])} pts, {ci} "
                 f"[{_pts(ret['ci_low'])}, {_pts(ret['ci_high'])}], McNemar p={ret['mcnemar_p']:.3g}",
                 ci=(ret["ci_low"], ret["ci_high"]), p_value=ret["mcnemar_p"], ci_of="QLoRA - LoRA"),
    ]


def merge_gate(g: GateParams, qlora_answers: list[str], merged_answers: list[str]) -> dict:
    a = stats.agreement(merged_answers, qlora_answers, confidence=g.confidence)
    return _verdict("merge_disagreement", a["share"], "<=", g.max_merge_disagreement,
                    f"merged and QLoRA answer differently on {a['differ']}/{a['n']} rows, "
                    f"{g.confidence:.0%} CI [{a['ci_low']:.3f}, {a['ci_high']:.3f}]",
                    ci=(a["ci_low"], a["ci_high"]))


def passed(verdicts: list[dict]) -> bool:
    return bool(verdicts) and all(v["passed"] for v in verdicts)


def explain(verdicts: list[dict]) -> str:
    def why(v: dict) -> str:
        x = v["ci_low"] if v["decided_on"] == "interval lower bound" else v["value"]
        return f"{v['name']}: {v['decided_on']} {x} {'<' if v['op'] == '>=' else '>'} required {v['threshold']} ({v['detail']})"
    return "; ".join(why(v) for v in verdicts if not v["passed"]) or "all gates passed"
