"""The run's verdict, from the model stage's per-row results: every gate (the domain test split's and each
suite's), each model's score with its interval, and the comparison with the champion.

Plain functions of (params, model-stage result): flows/model_stage.py asks `merge_worthwhile` before
merging, flows/retrain.py asks `gate_decision` before registering and `promotion` inside the registry
slot. The statistics are tasks.stats and tasks.gate; this module only decides which rows go where: the
gate metric's per-row scores for the domain split, each suite's own metric for its suite, and the
candidate that would be registered (the merged model once it exists, QLoRA before).
"""
from __future__ import annotations

from tasks import gate, stats
from tasks.config import Params

TEST = "test"


def _correct(rows: dict) -> list[bool]:
    return rows["correct"]


def candidate(ms: dict) -> str:
    """The model the suites judge: the merged model (the bytes registered) once it exists, else QLoRA."""
    return "merged" if "merged" in ms["rows"] else "qlora"


def suite_gates(params: Params, ms: dict, cand: str) -> list[dict]:
    """One verdict per gated suite (role gain or non_inferior), `cand` against the base on the suite's rows."""
    out = []
    for s in params.eval.suites:
        if s.role == "report":
            continue
        r = ms["suites"][s.name]["rows"]
        out.append(gate.suite_gate(s.name, s.role, _metric(s.metric), _scores(r["base"], s.metric),
                                   _scores(r[cand], s.metric), threshold=s.threshold,
                                   confidence=params.gates.confidence, seed=params.seed))
    return out


def _metric(name: str):
    from tasks.metrics import get

    return get(name)


def _scores(rows: dict, metric: str) -> list[float]:
    return rows["scores"][metric]


def pre_merge(params: Params, ms: dict) -> list[dict]:
    rows = ms["rows"]
    return gate.pre_merge_gates(params.gates, _correct(rows["base"]), _correct(rows["lora"]), _correct(rows["qlora"]),
                                seed=params.seed)


def merge_worthwhile(params: Params, ms: dict) -> bool:
    """Merge only a candidate that the pre-merge gates and every gated suite (QLoRA vs base) accept."""
    return gate.passed(pre_merge(params, ms) + suite_gates(params, ms, "qlora"))


def gate_decision(params: Params, ms: dict) -> tuple[list[dict], bool]:
    """Every gate on the model stage's saved per-row results, and whether the candidate may be registered:
    all gates passed AND a merged model was logged (the stage merges only after the pre-merge gates pass)."""
    rows = ms["rows"]
    verdicts = pre_merge(params, ms)
    if "merged" in rows:
        verdicts.append(gate.merge_gate(params.gates, rows["qlora"]["answers"], rows["merged"]["answers"]))
    verdicts += suite_gates(params, ms, candidate(ms))
    return verdicts, gate.passed(verdicts) and ms.get("model_uri") is not None


def with_intervals(params: Params, models: dict, rows: dict) -> None:
    """Each model's score with its interval at gates.confidence, written into its metrics dict."""
    for name, m in models.items():
        m["metric"], m["score"] = "exact_match", m["accuracy"]
        m["ci_low"], m["ci_high"] = stats.accuracy_interval(_correct(rows[name]), params.gates.confidence)


def with_suite_intervals(params: Params, suite, models: dict, rows: dict) -> None:
    """The same for one suite's models, in the suite's metric."""
    for name, m in models.items():
        sc = _scores(rows[name], suite.metric)
        m["metric"], m["score"] = suite.metric, sum(sc) / len(sc)
        m["ci_low"], m["ci_high"] = mean_interval(sc, params.gates.confidence, seed=params.seed)


def mean_interval(scores: list[float], confidence: float, seed: int = 0) -> tuple[float, float]:
    """Interval of a mean score: Wilson for 0/1 scores (as accuracy always had), else a seeded percentile
    bootstrap (scipy), which assumes nothing about the shape of per-row scores (many exact 0s and 1s)."""
    import numpy as np
    from scipy.stats import bootstrap

    x = np.asarray(scores, dtype=float)
    if np.isin(x, (0.0, 1.0)).all():
        return stats.accuracy_interval(x.astype(bool), confidence)
    if np.ptp(x) == 0:
        return float(x[0]), float(x[0])
    r = bootstrap((x,), np.mean, confidence_level=confidence, method="percentile", n_resamples=10_000,
                  random_state=np.random.default_rng(seed))
    return float(r.confidence_interval.low), float(r.confidence_interval.high)


def promotion(params: Params, cand: dict, champ: dict) -> dict:
    """stats.decide on the candidate's and the champion's per-row results on the same rows."""
    if champ["ids"] != cand["ids"]:
        raise RuntimeError(f"champion v{champ.get('version')} was scored on other rows than the candidate; not comparable")
    return stats.decide(stats.PromotionPolicy.from_registry(params.registry), _correct(cand), _correct(champ),
                        seed=params.seed)
