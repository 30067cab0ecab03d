"""Gate verdicts carry their numbers and fail on the right side of each threshold."""
from tasks.config import GateParams
from tasks.gate import explain, merge_gate, passed, pre_merge_gates


def test_pre_merge_gates_pass_and_fail():
    g = GateParams(min_gain_over_base=0.2, min_retention_vs_lora=0.9)
    ok = pre_merge_gates(g, base=0.1, lora=0.8, qlora=0.75)
    assert passed(ok) and ok[0]["value"] == 0.65 and ok[1]["value"] == 0.9375
    bad = pre_merge_gates(g, base=0.1, lora=0.8, qlora=0.25)
    assert not passed(bad)
    assert [v["name"] for v in bad if not v["passed"]] == ["gain_over_base", "retention_vs_lora"]
    assert "gain_over_base: 0.15 < required 0.2" in explain(bad)


def test_threshold_is_inclusive_and_merge_gate():
    g = GateParams(min_gain_over_base=0.5, max_merge_delta=0.02)
    assert pre_merge_gates(g, base=0.25, lora=1.0, qlora=0.75)[0]["passed"]
    assert merge_gate(g, qlora=0.8, merged=0.79)["passed"]
    assert not merge_gate(g, qlora=0.8, merged=0.7)["passed"]
    assert not passed([])
