"""The run's verdict, from the model stage's per-row results: every gate (the domain test split's and each
suite's), each model's score with its interval, and the comparison with the champion.

Plain functions of (params, model-stage result): flows/model_stage.py asks `merge_worthwhile` before
merging, flows/retrain.py asks `gate_decision` before registering and `promotion` inside the registry
slot. The statistics are tasks.gates.{paired,policy,gate}; this module only decides which rows go where: the
gate metric's (eval.metric) per-row scores for the domain split, each suite's own metric for its suite,
and the candidate a suite judges (the merged model, the bytes registered, once it exists; QLoRA before).
"""
from __future__ import annotations

from qlora_ops.tasks.gates import gate
from qlora_ops.tasks.gates import paired
from qlora_ops.tasks.gates import policy
from qlora_ops.tasks.core.config import Params
from qlora_ops.tasks.metrics import get


def candidate(ms: dict) -> str:
    """The model the suites judge: the merged model (the bytes registered) once it exists, else QLoRA."""
    return "merged" if "merged" in ms["rows"] else "qlora"


def suite_gates(params: Params, ms: dict, cand: str) -> list[dict]:
    """One verdict per gated suite (role gain or non_inferior): `cand` against the base on the suite's rows."""

    out = []
    for s in params.eval.suites:
        if s.role == "report":
            continue
        m, r = get(s.metric), ms["suites"][s.name]["rows"]
        out.append(gate.suite_gate(s.name, s.role, m, gate.gate_scores(r["base"], m), gate.gate_scores(r[cand], m),
                                   threshold=s.threshold, confidence=params.gates.confidence, seed=params.seed))
    return out


def pre_merge(params: Params, ms: dict) -> list[dict]:
    m, rows = gate.gate_metric(params), ms["rows"]
    base, lora, qlora = (gate.gate_scores(rows[k], m) for k in ("base", "lora", "qlora"))
    return gate.pre_merge_gates(params.gates, m, base, lora, qlora, seed=params.seed)


def merge_worthwhile(params: Params, ms: dict) -> bool:
    """Merge only a candidate that the pre-merge gates and every gated suite (QLoRA vs base) accept."""
    return gate.passed(pre_merge(params, ms) + suite_gates(params, ms, "qlora"))


def gate_decision(params: Params, ms: dict) -> tuple[list[dict], bool]:
    """Every gate on the model stage's saved per-row results, and whether the candidate may be registered:
    all gates passed AND a merged model was logged (the stage merges only after the pre-merge gates pass).
    The merge gate compares the merged model with the QLoRA answers of the adapter that was logged and
    merged: the evaluation is keyed on that adapter's content (tasks/model/keys.py)."""
    rows, m = ms["rows"], gate.gate_metric(params)
    verdicts = pre_merge(params, ms)
    if "merged" in rows:
        verdicts.append(gate.merge_gate(params.gates, m, gate.gate_scores(rows["qlora"], m),
                                        gate.gate_scores(rows["merged"], m), rows["qlora"]["answers"],
                                        rows["merged"]["answers"], seed=params.seed))
    verdicts += suite_gates(params, ms, candidate(ms))
    return verdicts, gate.passed(verdicts) and ms.get("model_uri") is not None


def _score(params: Params, metric, m: dict, rows: dict) -> None:
    sc = gate.gate_scores(rows, metric)
    m["metric"], m["score"] = metric.name, sum(sc) / len(sc)
    m["ci_low"], m["ci_high"] = paired.mean_interval(sc, params.gates.confidence, binary=metric.binary, seed=params.seed)


def with_intervals(params: Params, models: dict, rows: dict) -> None:
    """Each model's score on the gate metric with its interval at gates.confidence, into its metrics dict
    (exact match: accuracy with its Wilson interval, as before)."""
    metric = gate.gate_metric(params)
    for name, m in models.items():
        _score(params, metric, m, rows[name])


def with_suite_intervals(params: Params, suite, models: dict, rows: dict) -> None:
    """The same for one suite's models, in the suite's metric."""

    for name, m in models.items():
        _score(params, get(suite.metric), m, rows[name])


def champion_guards(params: Params, ms: dict, cand: str = "merged") -> list[dict] | None:
    """Every non_inferior suite again, `cand` vs the champion on the suite's rows (the model stage scored the
    champion on every suite): a candidate that stayed within the margin of the base but lost to the champion
    must not take `champion`. [] without such suites; None when a guard suite has no champion rows."""
    out = []
    for s in params.eval.suites:
        if s.role != "non_inferior":
            continue
        r = ms.get("suites", {}).get(s.name, {}).get("rows", {})
        if "champion" not in r or cand not in r:
            return None
        m = get(s.metric)
        out.append(gate.suite_gate(s.name, s.role, m, gate.gate_scores(r["champion"], m), gate.gate_scores(r[cand], m),
                                   threshold=s.threshold, confidence=params.gates.confidence, seed=params.seed,
                                   ref="champion"))
    return out


def class_guards(params: Params, cand: dict, champ: dict, references: dict[str, str]) -> list[dict]:
    """gates.max_class_loss on a label task: per class, the candidate's recall against the champion's on the
    same test rows of that class (`references`: test row id -> its label), a non-inferiority guard at the
    margin. Named "class <label>:non_inferior_vs_champion". [] when off, not a label task, or no champion rows."""
    margin = params.gates.max_class_loss
    if margin is None or not params.data.labels or not champ or champ.get("ids") != cand.get("ids"):
        return []
    m = get("exact_match")  # recall of a class = the share of its rows answered right
    out = []
    for label in params.data.labels:
        idx = [i for i, rid in enumerate(cand["ids"]) if references.get(rid) == label]
        if not idx:
            continue
        v = gate.suite_gate(f"class {label}", "non_inferior", m, [float(champ["correct"][i]) for i in idx],
                            [float(cand["correct"][i]) for i in idx], threshold=margin,
                            confidence=params.gates.confidence, seed=params.seed, ref="champion")
        v["detail"] = v["detail"].replace(f"suite 'class {label}' (exact_match,", f"class {label!r} recall (")
        out.append(v)
    return out


def promotion(params: Params, cand: dict, champ: dict, guards: list[dict] | None = None) -> dict:
    """policy.decide on the gate metric's per-row scores of the candidate and the champion, same rows; with
    `guards` (champion_guards), promotion also requires every guard suite to pass against the champion."""
    if champ["ids"] != cand["ids"]:
        raise RuntimeError(f"champion v{champ.get('version')} was scored on other rows than the candidate; not comparable")
    m = gate.gate_metric(params)
    if m.name == "nll" and None not in (cand.get("tokenizer"), champ.get("tokenizer")) and \
            cand["tokenizer"] != champ["tokenizer"]:
        # nats per token count other tokens under another tokenizer: not the same quantity
        return {"promote": False, "guards": guards or [], "reason": (
            f"keep champion: nll is per token, and champion v{champ.get('version')} was scored with another "
            f"tokenizer ({champ['tokenizer']} vs {cand['tokenizer']}): not comparable; compare bits per byte "
            "(the report's nll_totals) and promote by hand with `qlora-ops promote N --force --reason ...`")}
    d = policy.decide(policy.PromotionPolicy.from_registry(params.registry), gate.gate_scores(cand, m),
                      gate.gate_scores(champ, m), seed=params.seed, higher_is_better=m.higher_is_better,
                      binary=m.binary, metric_name=m.name)
    lost = [v for v in guards or [] if not v["passed"]]
    if lost:
        d["promote"] = False
        d["reason"] = (f"keep champion: {gate.explain(lost)}; on the gate metric: "
                       + d["reason"].removeprefix("promote: ").removeprefix("keep champion: "))
    d["guards"] = guards or []
    return d
