"""Gate stage: thresholds from params, one verdict per gate, each with its numbers.

Pre-merge gates decide whether merging is worth doing at all; the merge gate re-checks the merged
model against the QLoRA model it came from. Nothing is registered unless every gate passed.
"""
from __future__ import annotations

from tasks.config import GateParams


def _verdict(name: str, value: float, op: str, threshold: float, detail: str) -> dict:
    ok = value >= threshold if op == ">=" else value <= threshold
    return {"name": name, "value": round(value, 6), "op": op, "threshold": threshold, "passed": bool(ok), "detail": detail}


def pre_merge_gates(g: GateParams, base: float, lora: float, qlora: float) -> list[dict]:
    retention = qlora / lora if lora > 0 else (1.0 if qlora >= lora else 0.0)
    return [
        _verdict("gain_over_base", qlora - base, ">=", g.min_gain_over_base,
                 f"QLoRA {qlora:.4f} - base {base:.4f}"),
        _verdict("retention_vs_lora", retention, ">=", g.min_retention_vs_lora,
                 f"QLoRA {qlora:.4f} / LoRA {lora:.4f}"),
    ]


def merge_gate(g: GateParams, qlora: float, merged: float) -> dict:
    return _verdict("merge_delta", abs(merged - qlora), "<=", g.max_merge_delta,
                    f"|merged {merged:.4f} - QLoRA {qlora:.4f}|")


def passed(verdicts: list[dict]) -> bool:
    return bool(verdicts) and all(v["passed"] for v in verdicts)


def explain(verdicts: list[dict]) -> str:
    failed = [v for v in verdicts if not v["passed"]]
    return "; ".join(f"{v['name']}: {v['value']} {'<' if v['op'] == '>=' else '>'} required {v['threshold']} ({v['detail']})"
                     for v in failed) or "all gates passed"
