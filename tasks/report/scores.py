"""The run report's parts for scored (not only right/wrong) answers, and for extra eval suites.

    metric = gate_metric(f)                      # the run's eval.metric (exact_match for runs before it)
    score_table(f["summary"]["models"])          # model x metric means
    lost_rows(f, metric, "lora")                 # rows QLoRA lost most to LoRA, every model's answer beside
    suite_tables(f["summary"], f["gates"])       # one table per suite of summary["suites"]

tasks/report/html.py renders them: the score distributions and the lost rows for a free-text gate metric,
the suite tables whenever the run has suites (card.py lists those too). Runs saved before per-row scores
(predictions without "scores") read exact match from `correct`, so `qlora-ops report` keeps working on them.
"""
from __future__ import annotations

from qlora_ops.tasks import metrics as M
from qlora_ops.tasks.report.plots import png_base64

MODELS = ("base", "lora", "qlora", "merged")
LABEL = {"base": "base", "lora": "LoRA", "qlora": "QLoRA", "merged": "merged"}


def gate_metric(f: dict) -> str:
    """The metric the run was gated on: its logged eval.metric, else what its evaluations recorded."""
    name = f.get("params", {}).get("eval.metric") or f["summary"]["models"].get("qlora", {}).get("metric")
    return name if name in M.METRICS else "exact_match"


def row_score(r: dict, metric: str) -> float | None:
    if "scores" in r and metric in r["scores"]:
        return float(r["scores"][metric])
    return float(bool(r["correct"])) if metric == "exact_match" else None


def score_table(models: dict):
    """Mean of every metric each model was scored with (gate metric first, as metrics.json lists it)."""
    import pandas as pd

    rows = []
    for name in [m for m in MODELS if m in models] + sorted(set(models) - set(MODELS)):
        m = models[name]
        rows.append({"model": name, **(m.get("metrics") or {"exact_match": m.get("accuracy")}), "n": m.get("n")})
    return pd.DataFrame(rows)


def distribution_plot(preds: dict[str, list[dict]], metric: str) -> str | None:
    """One histogram per model of its per-row `metric` scores, on shared bins (PNG, base64)."""
    fig = distribution_figure(preds, metric)
    return None if fig is None else png_base64(fig)


def distribution_figure(preds: dict[str, list[dict]], metric: str):
    import numpy as np
    from matplotlib.figure import Figure

    m = M.get(metric)
    series = {k: [s for r in preds[k] if (s := row_score(r, metric)) is not None] for k in MODELS if k in preds}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    top = m.hi if m.hi != float("inf") else max(max(v) for v in series.values()) or 1.0
    bins = np.linspace(m.lo, top, 11)
    # constrained layout makes room for the figure's title above the panels' own titles (without it the two
    # overlapped on a 2.8-inch-high figure: the suptitle sat at a fixed height over the axes titles)
    fig = Figure(figsize=(2.6 * len(series) + 0.6, 3.0), layout="constrained")
    axes = fig.subplots(1, len(series), sharey=True, squeeze=False)[0]
    for ax, (k, v) in zip(axes, series.items()):
        ax.hist(v, bins=bins, color="tab:blue" if k == "qlora" else "tab:gray", edgecolor="white")
        ax.axvline(float(np.mean(v)), color="black", ls="--", lw=1)
        ax.set(title=f"{LABEL[k]} (mean {np.mean(v):.3f})", xlabel=metric)
    axes[0].set_ylabel("test rows")
    fig.suptitle(f"Per-row {metric} on the same test rows ({'higher' if m.higher_is_better else 'lower'} is better)")
    return fig


def lost_rows(f: dict, metric: str, against: str, k: int = 8):
    """The k rows where QLoRA's `metric` fell furthest below `against`'s (lora or base), with the
    reference and every model's answer side by side; only rows QLoRA actually lost."""
    import pandas as pd

    preds = f["predictions"]
    if "qlora" not in preds or against not in preds:
        return pd.DataFrame()
    sign = 1.0 if M.get(metric).higher_is_better else -1.0
    by = {name: {r["id"]: r for r in rows} for name, rows in preds.items()}
    out = []
    for r in preds["qlora"]:
        o = by[against].get(r["id"])
        q, a = row_score(r, metric), row_score(o, metric) if o else None
        if q is None or a is None or sign * (a - q) <= 0:
            continue
        row = {"id": r["id"], "prompt": " ".join(f.get("test", {}).get(r["id"], {}).get("prompt", "").split()),
               "reference": r["reference"]}
        for name in MODELS:
            if name in by and r["id"] in by[name]:
                row[LABEL[name]] = by[name][r["id"]]["prediction"]
        row[f"QLoRA {metric}"], row[f"{LABEL[against]} {metric}"] = round(q, 4), round(a, 4)
        row["lost"] = round(sign * (a - q), 4)
        out.append(row)
    out.sort(key=lambda x: -x["lost"])
    return pd.DataFrame(out[:k])


def suite_tables(summary: dict, gates: list[dict]) -> list[tuple[str, str, object]]:
    """[(suite name, heading, table)] for summary["suites"] (empty when the run has none): each model's
    mean on the suite's metric, with the suite's gate verdict in the heading."""
    import pandas as pd

    out = []
    for name, s in sorted((summary.get("suites") or {}).items()):
        metric = s.get("metric", "exact_match")
        rows = [{"model": model, metric: (m.get("metrics") or {}).get(metric, m.get("accuracy")), "n": m.get("n")}
                for model, m in s.get("models", {}).items()]
        verdicts = [g for g in gates if g.get("suite") == name]
        what = "; ".join(f"{g['name']} {'PASS' if g['passed'] else 'FAIL'}" for g in verdicts)
        head = f"{name}: {s.get('role', 'report')} on {metric}" + (f" (threshold {s['threshold']})" if s.get("threshold") is not None else "")
        out.append((name, head + (f" - {what}" if what else ""), pd.DataFrame(rows)))
    return out
