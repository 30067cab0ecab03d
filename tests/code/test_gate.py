"""Gates on paired per-row outcomes: each planted candidate is refused by the right gate, with its interval."""
from __future__ import annotations

from tasks import gate
from tasks.config import GateParams

G = GateParams(min_gain_over_base=0.2, min_retention_vs_lora=0.9, max_merge_disagreement=0.05)
N = 200


def rows(acc: float, shift: int = 0) -> list[bool]:
    """acc*N right answers; `shift` rotates which rows, so two vectors can share accuracy yet differ per row."""
    k = round(acc * N)
    v = [i < k for i in range(N)]
    return v[shift:] + v[:shift]


def by_name(vs):
    return {v["name"]: v for v in vs}


def test_good_candidate_passes_with_intervals():
    vs = by_name(gate.pre_merge_gates(G, base=rows(0.05), lora=rows(0.70), qlora=rows(0.68)))
    assert gate.passed(list(vs.values()))
    g = vs["gain_over_base"]
    assert g["ci_low"] < g["value"] < g["ci_high"] and g["decided_on"] == "interval lower bound"
    assert "CI" in g["detail"] and "McNemar" in g["detail"]


def test_worse_than_base_is_refused_by_gain_gate():
    vs = by_name(gate.pre_merge_gates(G, base=rows(0.30), lora=rows(0.30), qlora=rows(0.25)))
    assert not vs["gain_over_base"]["passed"] and vs["retention_vs_lora"]["passed"] is False  # 0.25/0.30 < 0.9
    assert "gain_over_base" in gate.explain(list(vs.values()))


def test_point_gain_above_threshold_but_interval_below_is_refused():
    # 0.22 point gain over base on 200 rows: the lower bound is far below 0.2, so the gate refuses.
    vs = by_name(gate.pre_merge_gates(G, base=rows(0.40), lora=rows(0.62), qlora=rows(0.62, shift=30)))
    assert vs["gain_over_base"]["value"] >= 0.2 and not vs["gain_over_base"]["passed"]


def test_below_retention_bar_is_refused_by_retention_gate():
    vs = by_name(gate.pre_merge_gates(G, base=rows(0.0), lora=rows(0.80), qlora=rows(0.60)))
    assert vs["gain_over_base"]["passed"] and not vs["retention_vs_lora"]["passed"]
    assert vs["retention_vs_lora"]["value"] == 0.75


def test_merge_gate_counts_flips_in_both_directions():
    q = ["a"] * 100
    m = ["b"] * 5 + ["a"] * 95  # 5 rows changed answer ...
    same_acc_other_flips = ["b"] * 3 + ["a"] * 97
    v = gate.merge_gate(G, q, m)
    assert v["value"] == 0.05 and v["passed"] and v["ci_low"] < 0.05 < v["ci_high"]
    drift = ["x"] * 10 + ["a"] * 90  # ... vs a drifting merge: 10 % of answers changed
    assert not gate.merge_gate(G, q, drift)["passed"]
    assert gate.merge_gate(G, q, same_acc_other_flips)["value"] == 0.03
