"""The report's and the card's tables: pandas frames (and plain rows) built from what gather.py read.

    accuracy_frame(f)          # model x gate-metric mean with its interval (+ the champion on these rows)
    gate_frame(f["gates"])     # one row per gate verdict
    confusion(refs, preds)     # (confusion matrix, per-class precision/recall/F1) of a label task
    macro_f1(per)              # the unweighted mean of the per-class F1: every class counts the same
    recall_vs_champion(...)    # per-class recall of the candidate and the champion on the same rows
    sample_rows(f)             # test rows, worst first, base vs the tuned model
    stage_table(...)           # seconds (and peak memory) per stage
    data_frame(f)              # this run's data vs the champion's run's
    serving_rows(f["serving"]) # evaluated, served and GGUF metrics with their digests

pandas is imported inside the functions that build a frame (start-up cost), as in the other report modules.
"""
from __future__ import annotations

from qlora_ops.tasks.gates import paired
from qlora_ops.tasks.gates.gate import gate_scores
from qlora_ops.tasks.metrics import get, normalize

PIPELINE = ("base_model", "quantize_base", "train_qlora", "train_lora", "eval_base", "eval_lora", "eval_qlora", "merge", "eval_merged",
            "log_model", "champion")  # the model stage's steps, in the order flows/model_stage.py runs them


def ordered(models: dict) -> list[tuple[str, dict]]:
    """base, LoRA, QLoRA, merged: pipeline order (summary.json is logged with sorted keys)."""
    rank = {k: i for i, k in enumerate(("base", "lora", "qlora", "merged"))}
    return sorted(models.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))


# ---------------------------------------------------------------- pure parts (tests/code/test_report.py)

def confusion(references: list[str], predictions: list[str], labels: list[str] | None = None):
    """(confusion matrix: reference x predicted counts, per-class table). Answers are compared as the
    accuracy metric compares them (normalized); a prediction outside the label set is `(other)`. Per class:
    n, correct, recall (the share of its rows answered right: its accuracy), precision (the share of the
    answers naming it that were right) and F1; a class with no rows (or never predicted) has no recall
    (precision), and an F1 of 0 when the other is defined."""
    import pandas as pd

    classes = sorted({normalize(x) for x in (labels or references)})
    ref = pd.Categorical([normalize(r) for r in references], categories=classes)
    pred = [normalize(p) for p in predictions]
    pred = pd.Categorical([p if p in classes else "(other)" for p in pred], categories=[*classes, "(other)"])
    cm = pd.crosstab(pd.Series(ref, name="reference"), pd.Series(pred, name="predicted"), dropna=False)
    hits = pd.Series([r == p for r, p in zip(ref, pred)])
    per = (pd.DataFrame({"label": ref, "correct": hits}).groupby("label", observed=False)["correct"]
           .agg(n="size", correct="sum").reset_index())
    predicted = cm.sum(axis=0).reindex(classes).to_numpy()
    per["recall"] = (per["correct"] / per["n"].where(per["n"] > 0)).round(4)
    per["precision"] = (per["correct"] / pd.Series(predicted).where(predicted > 0)).round(4)
    pr = per["precision"].fillna(0) + per["recall"].fillna(0)
    per["f1"] = (2 * per["precision"].fillna(0) * per["recall"].fillna(0) / pr.where(pr > 0)).fillna(0).round(4)
    per.loc[per["precision"].isna() & per["recall"].isna(), "f1"] = float("nan")
    return cm, per


def macro_f1(per) -> float:
    """Macro-F1 (scikit-learn's average="macro" over the classes with rows or predictions): the mean of the
    per-class F1, so a rare class weighs as much as a frequent one, unlike accuracy."""
    return round(float(per["f1"].dropna().mean()), 4) if per["f1"].notna().any() else float("nan")


def recall_vs_champion(references: list[str], correct: list[bool], champion_correct: list[bool],
                       labels: list[str] | None = None):
    """Per class, on the same test rows: n, the candidate's recall, the champion's, and the change
    (candidate - champion): a class the candidate answers worse than the champion shows here even when the
    overall accuracy rose. Rows in test order (the champion's `correct` is saved in that order)."""
    import pandas as pd

    if len(correct) != len(champion_correct) or len(correct) != len(references):
        raise ValueError(f"{len(correct)} candidate rows, {len(champion_correct)} champion rows: not the same rows")
    classes = sorted({normalize(x) for x in (labels or references)})
    df = pd.DataFrame({"label": pd.Categorical([normalize(r) for r in references], categories=classes),
                       "candidate": [bool(x) for x in correct], "champion": [bool(x) for x in champion_correct]})
    per = df.groupby("label", observed=False).agg(n=("candidate", "size"), candidate=("candidate", "mean"),
                                                  champion=("champion", "mean")).reset_index()
    per = per[per["n"] > 0].reset_index(drop=True)
    per["change"] = per["candidate"] - per["champion"]
    return per.round(4)


def worst_first(rows: list[dict]) -> list[dict]:
    """Rows with `base_correct` / `tuned_correct`: regressions (base right, tuned wrong) first, then the
    other rows the tuned model gets wrong, then its fixes, then rows both get right; stable inside each."""
    rank = {(True, False): 0, (False, False): 1, (False, True): 2, (True, True): 3}
    return sorted(rows, key=lambda r: rank[(bool(r["base_correct"]), bool(r["tuned_correct"]))])


def stage_table(stage_seconds: dict, stage_peak_mb: dict | None = None):
    """Seconds per stage, with the peak-memory column only when the run recorded it."""
    import pandas as pd

    # Pipeline order (summary.json is logged with sorted keys); a stage not listed here goes before the total.
    order = ["prepare", "model_stage", *(f"ms.{k}" for k in PIPELINE), "register"]
    names = sorted(stage_seconds, key=lambda k: (k == "total", order.index(k) if k in order else len(order)))
    df = pd.DataFrame({"stage": names, "seconds": [stage_seconds[k] for k in names]})
    if stage_peak_mb:
        # Model-stage entries are "ms.<stage>" in stage_seconds; their peaks may be keyed either way.
        df["peak MiB"] = [stage_peak_mb.get(s, stage_peak_mb.get(s.removeprefix("ms."))) for s in df["stage"]]
    return df


# ---------------------------------------------------------------- tables of gathered facts

def gate_frame(verdicts: list[dict], level: str = "95%"):
    import pandas as pd

    return pd.DataFrame([{"gate": v["name"], "value": f"{v['value']:.4f}",
                          f"{level} interval": f"[{v['ci_low']:.3f}, {v['ci_high']:.3f}]" if v.get("ci_low") is not None else "",
                          "interval of": v.get("ci_of", "") if v.get("ci_low") is not None else "",
                          "p": f"{v['p_value']:.3g}" if v.get("p_value") is not None else "",
                          "threshold": f"{v['op']} {v['threshold']}", "decided on": _rule(v),
                          "verdict": "PASS" if v["passed"] else "FAIL"} for v in verdicts])


def _rule(v: dict) -> str:
    """The gate's decision rule as the report prints it (docs/gates.md, "One rule"): a gate decided on its test
    says at which level (issue 26: the p-value used to be printed and never used)."""
    how = v["decided_on"]
    if how.startswith("test and") and v.get("confidence") is not None:
        return f"test p < {1 - v['confidence']:.3g} and {how.removeprefix('test and ')} {v['op']} threshold"
    return how


def accuracy_frame(f: dict):
    import pandas as pd

    conf = float(f["params"].get("gates.confidence", 0.95))
    # `score`: the gate metric's mean (exact match: the accuracy); its interval is ci_low/ci_high.
    rows = [{"model": k, "metric": m.get("metric", "exact_match"), "score": m.get("score", m["accuracy"]),
             "ci_low": m.get("ci_low"), "ci_high": m.get("ci_high"), "accuracy": m["accuracy"],
             "eos_rate": m["eos_rate"], "n": m["n"]} for k, m in ordered(f["summary"]["models"])]
    ch = f.get("champion")
    if ch and ch.get("correct"):
        m = get(rows[0]["metric"] if rows else "exact_match")
        try:
            sc = gate_scores(ch, m)  # exact match: its 0/1 `correct`, Wilson interval (mean_interval)
        except ValueError:  # a champion saved without per-row scores of this metric: not shown
            return pd.DataFrame(rows)
        lo, hi = paired.mean_interval(sc, conf, binary=m.binary)
        rows.append({"model": f"champion v{ch['version']}", "metric": m.name, "score": sum(sc) / len(sc), "ci_low": lo,
                     "ci_high": hi, "accuracy": sum(ch["correct"]) / len(sc), "eos_rate": None, "n": len(sc)})
    return pd.DataFrame(rows)


def sample_rows(f: dict, k: int = 8):
    import pandas as pd

    tuned = "merged" if "merged" in f["predictions"] else "qlora"
    base = {r["id"]: r for r in f["predictions"]["base"]}
    # One line per prompt: pandas' to_html would show its newlines as literal "\n".
    rows = [{"id": r["id"], "prompt": " ".join(f["test"].get(r["id"], {}).get("prompt", "").split()),
             "reference": r["reference"],
             "base answer": base[r["id"]]["prediction"], f"{tuned} answer": r["prediction"],
             "base_correct": base[r["id"]]["correct"], "tuned_correct": r["correct"]}
            for r in f["predictions"][tuned] if r["id"] in base]
    df = pd.DataFrame(worst_first(rows)[:k])
    if len(df):
        df["base"] = df.pop("base_correct").map({True: "right", False: "wrong"})
        df[tuned] = df.pop("tuned_correct").map({True: "right", False: "wrong"})
    return df, tuned


def data_frame(f: dict):
    import pandas as pd

    def col(d: dict | None, version: str | None) -> dict:
        d = d or {}
        st = d.get("stats", {})
        return {"data version": version or d.get("version", "?"), "DVC stage": d.get("stage", "?"),
                **{f"rows {k}": st.get(k, "?") for k in ("train", "val", "test")},
                "rows after dedupe": st.get("rows_after_dedupe", "?"),
                # the leak-proof split's bookkeeping (tasks/data/split.py): must be 0 to promote
                "test-set lineage": st.get("lineage", "?"), "contamination": st.get("contamination", "?"),
                "near-duplicate rows": st.get("near_duplicate_rows", "?")}

    out = {"this run": col(f["summary"]["data"], f["summary"]["data"]["version"])}
    if (ch := f.get("champion")):
        out[f"champion v{ch['version']}'s run"] = col(ch.get("data"), ch.get("data_version"))
    return pd.DataFrame(out)


def serving_rows(s: dict | None) -> list[dict]:
    """One row per fact: what was evaluated, served, exported, with the digests."""
    if not s or s.get("error"):
        return []
    rows = [{"what": "registered (evaluated)", "metric": f"{s.get('metric', 'exact_match')} {_fmt(s.get('evaluated'))}",
             "agreement": "",
             "digest": f"weights_digest {str(s.get('weights_digest') or '(none)')[:16]}"}]
    if p := s.get("parity"):
        rows.append({"what": f"served at {p['url']} ({'PASS' if p['passed'] else 'FAIL'})",
                     "metric": f"{p['metric']} {_fmt(p['served_metric'])}",
                     "agreement": f"{1 - p['share']:.4f} [{1 - p['ci_high']:.4f}, {1 - p['ci_low']:.4f}] on {p['n']} rows",
                     "digest": f"endpoint {str((p.get('endpoint') or {}).get('weights_digest') or '?')[:16]}"})
    for f in (s.get("gguf") or {}).get("files", []):
        par = ((s.get("gguf") or {}).get("parity") or {}).get(f["kind"])
        rows.append({"what": f"GGUF {f['file']}", "metric": f"{par['metric']} {_fmt(par['gguf_metric'])}" if par else "",
                     "agreement": f"{par['agreement']:.4f} [{par['ci_low']:.4f}, {par['ci_high']:.4f}] on {par['n']} rows"
                     if par else "", "digest": f"sha256 {f['sha256'][:16]}"})
    return rows


def _fmt(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "?"
