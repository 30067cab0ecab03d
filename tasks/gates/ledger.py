"""The decision ledger: every promotion decision made on a test-set lineage, and what it spends of the
yearly false-promotion budget (docs/gates.md, "Over a year").

Each time the paired policy compares a candidate with the champion on the test set, automatically (a run)
or by hand (`qlora-ops promote`), a chance of promoting an equally good model is spent: at most alpha / 2
(the one-sided level the decision's interval and test run at). On one reused test set those chances add
up whatever the dependence between decisions (Bonferroni), so the budget is counted on the decisions
actually made, not on a schedule: drop-triggered runs, `--force`d reruns and manual promotions all count.
With `registry.yearly_false_promotion` B and `decisions_per_year` D, each decision runs at alpha = 2B/D;
once the decisions of the last 365 days on this lineage have spent B, no more automatic decision is made
on it until fresh test rows start a new lineage (`qlora-ops data new-lineage`), whose budget is whole.

A ledger entry is one tag on the candidate version, `decision:<unix ms>` = {"alpha", "lineage", "by"}:
written with the decision's other tags (tasks/registry/register.py, tasks/registry/manual.py), so it lives
in the registry beside what it decided, survives any workspace, and is read back by `ledger_of`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from qlora_ops.tasks.gates.policy import PromotionPolicy

__all__ = ["Entry", "account", "entry_tag", "explain", "ledger_of", "spent_message"]

PREFIX = "decision:"
YEAR_S = 365 * 24 * 3600
_EPS = 1e-12


@dataclass(frozen=True)
class Entry:
    version: int
    at: float          # unix seconds
    alpha: float       # the decision's two-sided alpha: it spent alpha / 2
    lineage: int | None
    by: str            # "run <id>" or "promote by <user>"


def entry_tag(alpha: float, lineage: int | None, by: str, at: float | None = None) -> tuple[str, str]:
    """(key, value) of one ledger entry, to be written on the candidate version with the decision."""
    at = time.time() if at is None else at
    return f"{PREFIX}{int(at * 1000)}", json.dumps({"alpha": alpha, "lineage": lineage, "by": by[:200]})


def ledger_of(versions: dict[int, dict[str, str]]) -> list[Entry]:
    """Every entry in {version: its tags}, oldest first; an unreadable entry counts as a decision at 0.05
    (it was made; what it spent is not known, so the conventional level is assumed)."""
    out = []
    for v, tags in versions.items():
        for k, val in tags.items():
            if not k.startswith(PREFIX):
                continue
            try:
                at = int(k[len(PREFIX):]) / 1000
                d = json.loads(val)
                out.append(Entry(int(v), at, float(d["alpha"]), d.get("lineage"), str(d.get("by", ""))))
            except (ValueError, KeyError, TypeError):
                out.append(Entry(int(v), 0.0, 0.05, None, "unreadable entry"))
    return sorted(out, key=lambda e: e.at)


def account(policy: PromotionPolicy, entries: list[Entry], lineage: int | None, now: float | None = None) -> dict:
    """The budget on `lineage` over the last 365 days. `can_decide`: one more decision at the policy's alpha
    fits (always, with no yearly budget: then it is only counted)."""
    now = time.time() if now is None else now
    mine = [e for e in entries if e.lineage == lineage and now - e.at <= YEAR_S]
    spent = sum(e.alpha / 2 for e in mine)
    budget = policy.yearly_false_promotion
    per = policy.alpha / 2
    remaining = None if budget is None else max(budget - spent, 0.0)
    can = True if budget is None else spent + per <= budget + _EPS
    # when the oldest counted decision leaves the 365-day window (the budget grows back by its share)
    frees = min((e.at + YEAR_S for e in mine), default=None)
    return {"lineage": lineage, "decisions": len(mine), "spent": spent, "budget": budget, "remaining": remaining,
            "per_decision": per, "can_decide": can, "left": None if budget is None else int((remaining + _EPS) // per),
            "next_frees_at": frees}


def explain(a: dict) -> str:
    """One line for the summary, `status` and the card."""
    lin = f"test-set lineage {a['lineage']}" if a["lineage"] is not None else "this test set"
    if a["budget"] is None:
        return (f"{a['decisions']} promotion decisions on {lin} in the last 365 days (no yearly false-promotion "
                f"budget: registry.yearly_false_promotion is null)")
    return (f"{a['decisions']} promotion decisions on {lin} in the last 365 days spent {a['spent']:.4f} of the yearly "
            f"false-promotion budget {a['budget']:g}; {a['left']} more at {a['per_decision']:.4f} each")


def spent_message(a: dict, params_hint: str = "<file>") -> str:
    """Why no automatic decision is made, and what to do."""
    when = (time.strftime("%Y-%m-%d", time.gmtime(a["next_frees_at"])) if a.get("next_frees_at") else "later")
    return (f"not decided: the yearly false-promotion budget of test-set lineage {a['lineage']} is spent "
            f"({a['decisions']} decisions in the last 365 days spent {a['spent']:.4f} of {a['budget']:g}; one more "
            f"would spend {a['per_decision']:.4f}). Every look at the same test rows is another chance to promote an "
            f"equally good model. Fresh test rows start a new lineage with a whole budget: add new data, then "
            f"`qlora-ops data new-lineage --params {params_hint}`; or wait until {when}, when the oldest decision "
            "leaves the 365-day window; or promote by hand with `qlora-ops promote N --force --reason ...`")
