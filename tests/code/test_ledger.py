"""The decision ledger and the yearly false-promotion budget (tasks/gates/ledger.py): the arithmetic, then
for real on the session's MLflow server, the flow's decisions (flows.retrain.decide_promotion inside
tasks.registry.register.register_and_promote) writing entries, spending the budget of their test-set
lineage, and being deferred once it is spent while a new lineage decides again; `promote` refused alike."""
from __future__ import annotations

import time

import pytest

from qlora_ops.tasks.core.config import Params
from qlora_ops.tasks.gates import ledger
from qlora_ops.tasks.gates.policy import PromotionPolicy
from tests.code.test_registry_kills import model  # noqa: F401  (fixture: a fresh registered-model name)

WEEKLY = PromotionPolicy(yearly_false_promotion=0.05, decisions_per_year=52)


def entries(n: int, lineage: int | None = 1, at: float | None = None, alpha: float = WEEKLY.alpha) -> list:
    at = time.time() - 3600 if at is None else at
    return [ledger.Entry(i, at + i, alpha, lineage, "run") for i in range(n)]


def test_the_budget_holds_exactly_the_planned_decisions_per_lineage_and_year():
    assert ledger.account(WEEKLY, entries(51), 1)["can_decide"]
    a = ledger.account(WEEKLY, entries(52), 1)
    assert not a["can_decide"] and a["left"] == 0 and a["spent"] == pytest.approx(0.05)
    assert ledger.account(WEEKLY, entries(52), 2)["can_decide"]  # a new lineage: a whole budget
    old = entries(52, at=time.time() - 366 * 24 * 3600)
    assert ledger.account(WEEKLY, old, 1)["can_decide"]  # older than a year: out of the window
    # more decisions than planned (drops, reruns, promote) spend it sooner: 26 at twice the alpha
    assert not ledger.account(WEEKLY, entries(26, alpha=2 * WEEKLY.alpha), 1)["can_decide"]
    off = PromotionPolicy(yearly_false_promotion=None)
    a = ledger.account(off, entries(500, alpha=off.alpha), 1)
    assert a["can_decide"] and a["decisions"] == 500 and "no yearly false-promotion budget" in ledger.explain(a)


def test_entries_round_trip_through_tags_and_an_unreadable_one_still_counts():
    k, v = ledger.entry_tag(0.002, 3, "run abc", at=1000.0)
    got = ledger.ledger_of({7: {k: v, "status": "ready"}, 8: {"decision:x": "{"}})
    assert got[1] == ledger.Entry(7, 1000.0, 0.002, 3, "run abc")
    assert got[0].version == 8 and got[0].alpha == 0.05  # made, spent unknown: the conventional level assumed


def test_a_spent_lineage_defers_the_flow_and_refuses_promote_until_a_new_lineage(model, tmp_path):  # noqa: F811
    from mlflow.tracking import MlflowClient

    from qlora_ops.flows import retrain
    from qlora_ops.tasks.registry import manual
    from qlora_ops.tasks.registry.register import PromotionError, register_and_promote

    name, uri, _, lock = model
    params = Params.model_validate({"registry": {"model_name": name, "yearly_false_promotion": 0.05,
                                                 "decisions_per_year": 2}})
    rows = {"ids": [f"r{i}" for i in range(40)], "correct": [i % 3 == 0 for i in range(40)],
            "answers": ["x"] * 40}

    def run(tag: str, lineage: int) -> dict:
        ms = {"rows": {"merged": rows}, "champion": {"version": 1, "how": "scored beside it", **rows},
              "score_key": "k"}
        return register_and_promote(
            model_uri=uri, model_name=name, alias="champion", challenger_alias=None, lock_path=lock,
            tags={"mlflow_run_id": tag, "fingerprint": f"fp-{tag}", "test_lineage": str(lineage)},
            decide=lambda v: retrain.decide_promotion(params, tmp_path, tag, ms, v, lineage))

    assert run("first", 1)["promoted"]  # the first champion: nothing decided, nothing spent
    for tag in ("a", "b"):  # an equally good candidate, decided twice on lineage 1: not promoted, spent
        r = run(tag, 1)
        assert not r["promoted"] and not r["deferred"], r
    c = MlflowClient()
    assert [e.lineage for e in ledger.ledger_of({int(v.version): v.tags for v in
                                                 c.search_model_versions(f"name = '{name}'")})] == [1, 1]
    spent = run("c", 1)
    assert spent["deferred"] and "budget of test-set lineage 1 is spent" in spent["reason"], spent
    assert "data new-lineage" in spent["reason"]
    assert not [k for k in c.get_model_version(name, str(spent["version"])).tags if k.startswith("decision:")]
    b = manual.budget(name, retrain.policy(params), 1)
    assert b["decisions"] == 2 and not b["can_decide"]
    assert "2 promotion decisions on test-set lineage 1" in manual.format_status(
        manual.status(name, ("champion",), None, policy=retrain.policy(params)))

    fresh = run("d", 2)  # fresh test rows: a new lineage decides again
    assert not fresh["deferred"], fresh

    # `promote` by hand on the spent lineage: refused before it looks at the rows
    with pytest.raises(PromotionError, match="budget of test-set lineage 1 is spent"):
        manual.promote(name, int(spent["version"]), "champion", retrain.policy(params), tmp_path / "promote",
                       by=manual.Actor("tester", False, "test"))
