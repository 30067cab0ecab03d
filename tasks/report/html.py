"""Run report (one self-contained HTML page, plots inlined as base64 PNG) and model card (markdown).

    qlora-ops report [RUN_ID]    # rebuilds both for any past run, from MLflow alone

`gather` is the one place that reads a run's facts from MLflow (summary.json, model_stage.json,
gates.json, eval/<model>/predictions.jsonl, the prepared test split, the train-qlora/train-lora child
runs, the compared champion's version and run); `render_html` and `model_card` only format them. The
card is also written at registration time from the same summary the run is about to log
(`model_card(summary, params, labels, decision)`), so the version's description and the
`report/MODEL_CARD.md` artifact come out of one renderer.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

REPORT = "report/report.html"
CARD = "report/MODEL_CARD.md"
CARD_LIMIT = 5000  # MLflow's model-version description column (String(5000) on SQL stores)
PIPELINE = ("base_model", "quantize_base", "train_qlora", "train_lora", "eval_base", "eval_lora", "eval_qlora", "merge", "eval_merged",
            "log_model", "champion")  # the model stage's steps, in the order flows/model_stage.py runs them
MAX_CLASSES = 20   # more distinct answers than this is free text: no confusion matrix


def ordered(models: dict) -> list[tuple[str, dict]]:
    """base, LoRA, QLoRA, merged: pipeline order (summary.json is logged with sorted keys)."""
    rank = {k: i for i, k in enumerate(("base", "lora", "qlora", "merged"))}
    return sorted(models.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))


def report_uri(run_id: str) -> str:
    return f"runs:/{run_id}/{REPORT}"


# ---------------------------------------------------------------- pure parts (tests/code/test_report.py)

def is_label_task(references: list[str], labels: list[str] | None = None) -> bool:
    """`data.labels` set, or few distinct short references (each repeated): a classification task."""
    if labels:
        return True
    distinct = set(references)
    return 1 < len(distinct) <= MAX_CLASSES and len(distinct) < len(references) / 2 \
        and all(len(r) <= 40 for r in distinct)


def label_set(param_labels: list[str] | None, counts: dict[str, int] | None) -> list[str] | None:
    """`data.labels`, else the prepared data's answers when they look like labels (few, short, repeated)."""
    if param_labels:
        return list(param_labels)
    if counts and len(counts) <= MAX_CLASSES and min(counts.values()) >= 2 and all(len(k) <= 40 for k in counts):
        return sorted(counts)
    return None


def confusion(references: list[str], predictions: list[str], labels: list[str] | None = None):
    """(confusion matrix: reference x predicted counts, per-class accuracy table). Answers are compared
    as the accuracy metric compares them (normalized); a prediction outside the label set is `(other)`."""
    import pandas as pd

    from qlora_ops.tasks.metrics import normalize

    classes = sorted({normalize(x) for x in (labels or references)})
    ref = pd.Categorical([normalize(r) for r in references], categories=classes)
    pred = [normalize(p) for p in predictions]
    pred = pd.Categorical([p if p in classes else "(other)" for p in pred], categories=[*classes, "(other)"])
    cm = pd.crosstab(pd.Series(ref, name="reference"), pd.Series(pred, name="predicted"), dropna=False)
    hits = pd.Series([r == p for r, p in zip(ref, pred)])
    per = (pd.DataFrame({"label": ref, "correct": hits}).groupby("label", observed=False)["correct"]
           .agg(n="size", correct="sum").reset_index())
    per["accuracy"] = (per["correct"] / per["n"].where(per["n"] > 0)).round(4)
    return cm, per


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


# ---------------------------------------------------------------- the model card

def _md(df) -> str:
    return df.to_markdown(index=False)


def model_card(summary: dict, params: dict[str, str], labels: list[str] | None, decision: dict) -> str:
    """Markdown card of a registered version. `params`: the run's flat params (as MLflow logs them);
    `decision`: version, promoted, reason (tasks.registry.register's answer)."""
    import pandas as pd

    from qlora_ops.tasks.gates import stats

    run_id, models, n = summary["mlflow_run_id"], summary["models"], summary["models"]["qlora"]["n"]
    st = summary["data"].get("stats", {})
    metric = params.get("eval.metric") or models["qlora"].get("metric") or "exact_match"
    gated = metric != "exact_match"  # a free-text run: its gate metric's mean beside exact match
    # The interval is the gate metric's (tasks/verdict.with_intervals), at the run's gates.confidence.
    level = stats.level(float(params.get("gates.confidence", 0.95)))
    acc = pd.DataFrame([{"model": k, **({metric: f"{(m.get('metrics') or {}).get(metric, float('nan')):.4f}"} if gated else {}),
                         f"{level} interval": f"[{m['ci_low']:.3f}, {m['ci_high']:.3f}]" if "ci_low" in m else "",
                         "accuracy": f"{m['accuracy']:.4f}",
                         "EOS rate": f"{m['eos_rate']:.2f}" if m.get("eos_rate") is not None else "", "n": m["n"]}
                        for k, m in ordered(models)])
    keys = ["seed", "model.source", "model.max_seq_len", "quantization.quant_type", "quantization.double_quant",
            "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "training.max_steps",
            "training.batch_size", "training.lr", "training.lr_scheduler", "training.warmup_steps",
            "data.system_prompt", "data.split", "data.max_input_chars"]
    par = pd.DataFrame([{"param": k, "value": params[k]} for k in keys if k in params])
    shown = ", ".join(f"`{x}`" for x in (labels or [])[:30]) + (f" (+{len(labels) - 30} more)" if len(labels or []) > 30 else "")
    merged = next((g for g in summary["gates"] if g["name"] == "merge_disagreement"), None)
    retention = next((g for g in summary["gates"] if g["name"] == "retention_vs_lora"), None)
    L = [f"# {params.get('registry.model_name', 'model')} v{decision['version']}", "",
         f"QLoRA fine-tune of `{params.get('model.source', '?')}` (4-bit {params.get('quantization.quant_type', 'nf4')} "
         "base, LoRA adapter merged into the dequantized base weights), registered by qlora-ops.", "",
         f"- MLflow run: `{run_id}`; adapter `runs:/{run_id}/adapters/qlora`",
         f"- run report: `{report_uri(run_id)}` (version tag `report_uri`)",
         f"- data version `{summary['data']['version']}` (DVC stage `{summary['data']['stage']}`), rows "
         f"train/val/test {st.get('train', '?')}/{st.get('val', '?')}/{st.get('test', '?')}"
         + (f" (the first {n} test rows evaluated: eval.max_examples)" if st.get("test", n) != n else ""),
         f"- code {str(summary['code']['git_commit'])[:10]} (source sha {summary['code']['source_sha']}), "
         f"fingerprint `{summary['fingerprint']}`", "",
         f"## Metrics (test split{f': {metric} (the gate metric) with its {level} bootstrap interval, and exact-match accuracy' if gated else f', exact-match accuracy, Wilson {level} interval'})",
         "", _md(acc), "",
         "## Gates", "", _md(gate_frame(summary["gates"], level)), "",
         *suite_card(summary),
         "## Promotion", "", f"{'Promoted to champion' if decision['promoted'] else 'Not promoted'}: "
         f"{decision['reason']}", "",
         "## Params", "", _md(par), "",
         "## Intended use", "",
         f"Answering prompts of the task it was trained on, in the same prompt format (system prompt: "
         f"\"{params.get('data.system_prompt', '')}\"), with "
         + ("answers like the references it was scored on. " if gated else "the short exact answers it was scored on. ")
         + "Not a general-purpose assistant; not evaluated on anything but this task's test split.", "",
         "## Limits", ""]
    q_score = (models["qlora"].get("metrics") or {}).get(metric, models["qlora"]["accuracy"]) if gated else models["qlora"]["accuracy"]
    drift = (f", whose per-row {metric} differs from the QLoRA model's by {merged['value']:.4f} on average." if gated else
             f", which answers differently from the QLoRA model on {merged['value']:.1%} of test rows.") if merged else "."
    L.append(f"- QLoRA: trained against a 4-bit {params.get('quantization.quant_type', 'nf4')}-quantized base. "
             f"Its test {metric if gated else 'accuracy'} is "
             f"{q_score:.4f}" + (f", {retention['value']:.1%} of the full-precision LoRA "
                                 f"baseline's gain over the base" if retention else "")
             + "; the served model is the adapter merged into the dequantized base" + drift)
    power = (summary.get("power") or "").removeprefix(f"test set has {n} rows: ")
    L.append(f"- Test set: {n} rows; " + (power or "enough for the promotion policy's non-inferiority margin."))
    if labels:
        L.append(f"- Label set: {shown}.")
    else:
        from qlora_ops.tasks import metrics as M
        L.append(f"- Free-text answers (no label set); gated on {metric}: {M.get(metric).doc}. Accuracy is exact match.")
    text = "\n".join(L) + "\n"
    if len(text) > CARD_LIMIT:
        tail = f"\n\n(card cut at {CARD_LIMIT} characters; the full card is the run's `{CARD}`)\n"
        text = text[:CARD_LIMIT - len(tail)] + tail
    return text


def suite_card(summary: dict) -> list[str]:
    """The card's Suites section (nothing when the run has no suites): each suite's mean per model."""
    from qlora_ops.tasks.report import scores as rs

    tables = rs.suite_tables(summary, summary.get("gates", []))
    if not tables:
        return []
    return ["## Suites", ""] + [x for _, head, df in tables for x in (f"{head}:", "", _md(df.round(4)), "")]


def gate_frame(verdicts: list[dict], level: str = "95%"):
    import pandas as pd

    return pd.DataFrame([{"gate": v["name"], "value": f"{v['value']:.4f}",
                          f"{level} interval": f"[{v['ci_low']:.3f}, {v['ci_high']:.3f}]" if v.get("ci_low") is not None else "",
                          "interval of": v.get("ci_of", "") if v.get("ci_low") is not None else "",
                          "threshold": f"{v['op']} {v['threshold']}", "decided on": v["decided_on"],
                          "verdict": "PASS" if v["passed"] else "FAIL"} for v in verdicts])


# ---------------------------------------------------------------- gathering from MLflow

def _load_json(run_id: str, path: str):
    import mlflow

    return json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{path}"))


def _load_jsonl(run_id: str, path: str) -> list[dict]:
    import mlflow

    return [json.loads(x) for x in mlflow.artifacts.load_text(f"runs:/{run_id}/{path}").splitlines() if x.strip()]


class ReportError(RuntimeError):
    pass


def newest_run(experiment: str) -> str:
    """The newest finished retraining run of `experiment` (not its train-* child runs)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    exp = mlflow.get_experiment_by_name(experiment)
    runs = [] if exp is None else MlflowClient().search_runs(
        [exp.experiment_id], "tags.`qlora_ops.fingerprint` != '' and attributes.status = 'FINISHED'",
        max_results=1, order_by=["attributes.start_time DESC"])
    if not runs:
        raise ReportError(f"experiment {experiment!r} has no finished run to report on")
    return runs[0].info.run_id


def gather(run_id: str) -> dict:
    """Every fact the report and the card show, read from the run's MLflow record alone."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    c = MlflowClient()
    try:
        run = c.get_run(run_id)
    except MlflowException as e:
        raise ReportError(f"no MLflow run {run_id}: {e.message}") from None
    try:
        summary = _load_json(run_id, "summary.json")
    except (MlflowException, OSError) as e:
        raise ReportError(f"MLflow run {run_id} has no summary.json (it ended {run.info.status} before "
                          f"its summary was logged): {e}") from None
    ms = _load_json(run_id, "model_stage.json")
    f = {"run_id": run_id, "summary": summary, "params": dict(run.data.params), "model_stage": ms,
         "gates": _load_json(run_id, "gates.json"),
         "predictions": {m: _load_jsonl(run_id, f"eval/{m}/predictions.jsonl") for m in summary["models"]},
         "test": {r["id"]: r for r in _load_jsonl(run_id, "data/prepared/test.jsonl")}}
    try:
        counts = _load_json(run_id, "data/prepared/stats.json").get("labels")
    except (MlflowException, OSError, ValueError):
        counts = None
    f["labels"] = label_set(json.loads(f["params"].get("data.labels") or "null"), counts)
    f["curves"] = {}
    for child in c.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'"):
        kind = child.data.tags.get("qlora_ops.kind", child.info.run_name)
        f["curves"][kind] = {k: [(m.step, m.value) for m in sorted(c.get_metric_history(child.info.run_id, k),
                                                                   key=lambda m: m.step)]
                             for k in ("train_loss", "val_loss")}
    f["champion"] = _champion(c, f["params"].get("registry.model_name"), ms.get("champion"), summary)
    f["serving"] = serving_facts(c, f["params"].get("registry.model_name"), summary, run_id)
    return f


def _champion(c, model_name: str | None, champ: dict | None, summary: dict) -> dict | None:
    """The champion this run was compared with: its version, rows on this test set, and its run's data."""
    v = (champ or {}).get("version") or summary.get("registry", {}).get("previous_champion_version")
    if not v or not model_name:
        return None
    out = {"version": int(v), "correct": (champ or {}).get("correct"), "scores": (champ or {}).get("scores"),
           "how": (champ or {}).get("how", "")}
    try:
        tags = dict(c.get_model_version(model_name, str(v)).tags or {})
        out["data_version"], out["run_id"] = tags.get("data_version"), tags.get("mlflow_run_id")
        if out["run_id"]:
            out["data"] = _load_json(out["run_id"], "summary.json").get("data", {})
    except Exception as e:  # a deleted version or run: the report says so instead of failing
        out["error"] = f"{type(e).__name__}: {e}"
    return out


# ---------------------------------------------------------------- rendering

def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # Agg on this figure only: no pyplot, no process-wide backend switch
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _img(id_: str, b64: str, alt: str) -> str:
    return f'<img id="{id_}" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def loss_plot(curves: dict) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.6))
    ax = fig.add_subplot()
    for kind, color in (("qlora", "tab:blue"), ("lora", "tab:orange")):
        for k, style, lab in (("train_loss", "-", "train"), ("val_loss", "o--", "val")):
            pts = curves.get(kind, {}).get(k) or []
            if pts:
                ax.plot(*zip(*pts), style, color=color, label=f"{kind.upper()} {lab}", alpha=0.9 if lab == "val" else 0.7)
    ax.set(xlabel="step", ylabel="loss", title="Training: QLoRA vs the LoRA baseline (same data, same schedule)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def accuracy_plot(acc, level: str = "95%") -> str:
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.4))
    ax = fig.add_subplot()
    y = acc["score"].to_numpy(float)
    # Clipped at 0: a Wilson bound at accuracy 0 or 1 can sit a rounding error past the point.
    err = np.clip([y - acc["ci_low"].to_numpy(float), acc["ci_high"].to_numpy(float) - y], 0, None)
    ax.bar(acc["model"], y, yerr=err, capsize=6, color=["tab:gray", "tab:orange", "tab:blue", "tab:green",
                                                        "tab:purple"][:len(y)])
    for i, v in enumerate(y):
        ax.annotate(f"{v:.3f}", (i, v), xytext=(8, 3), textcoords="offset points", fontsize=9)
    metric = acc["metric"].iloc[0] if len(acc) else "exact_match"
    top = 1.05 if metric != "nll" else max(1.0, float(np.nanmax(acc["ci_high"].to_numpy(float))) * 1.1)
    ax.set(ylim=(0, top), ylabel=f"test {metric}", title=f"{metric} on the same test rows, with {level} intervals")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def confusion_plot(cm, title: str) -> str:
    from matplotlib.figure import Figure

    k = len(cm.index)
    fig = Figure(figsize=(1.2 + 0.6 * (k + 1), 1.0 + 0.5 * k))
    ax = fig.add_subplot()
    ax.imshow(cm.to_numpy(), cmap="Blues")
    ax.set_xticks(range(len(cm.columns)), [str(x) for x in cm.columns], rotation=45, ha="right")
    ax.set_yticks(range(k), [str(x) for x in cm.index])
    top = max(int(cm.to_numpy().max()), 1)
    for i in range(k):
        for j in range(len(cm.columns)):
            v = int(cm.iat[i, j])
            if v:
                ax.text(j, i, v, ha="center", va="center", color="white" if v > top / 2 else "black", fontsize=8)
    ax.set(xlabel="predicted", ylabel="reference", title=title)
    return _png(fig)


def accuracy_frame(f: dict):
    import pandas as pd

    from qlora_ops.tasks.gates import stats

    conf = float(f["params"].get("gates.confidence", 0.95))
    # `score`: the gate metric's mean (exact match: the accuracy); its interval is ci_low/ci_high.
    rows = [{"model": k, "metric": m.get("metric", "exact_match"), "score": m.get("score", m["accuracy"]),
             "ci_low": m.get("ci_low"), "ci_high": m.get("ci_high"), "accuracy": m["accuracy"],
             "eos_rate": m["eos_rate"], "n": m["n"]} for k, m in ordered(f["summary"]["models"])]
    ch = f.get("champion")
    if ch and ch.get("correct"):
        from qlora_ops.tasks.gates.gate import gate_scores
        from qlora_ops.tasks.metrics import get

        m = get(rows[0]["metric"] if rows else "exact_match")
        try:
            sc = gate_scores(ch, m)  # exact match: its 0/1 `correct`, Wilson interval (mean_interval)
        except ValueError:  # a champion saved without per-row scores of this metric: not shown
            return pd.DataFrame(rows)
        lo, hi = stats.mean_interval(sc, conf, binary=m.binary)
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
                "rows after dedupe": st.get("rows_after_dedupe", "?")}

    out = {"this run": col(f["summary"]["data"], f["summary"]["data"]["version"])}
    if (ch := f.get("champion")):
        out[f"champion v{ch['version']}'s run"] = col(ch.get("data"), ch.get("data_version"))
    return pd.DataFrame(out)


def render_html(f: dict) -> str:
    from qlora_ops.tasks.gates import stats

    s, run_id = f["summary"], f["run_id"]
    table = dict(index=False, border=0, classes="t", na_rep="")
    parts = [f"<h1>qlora-ops run report</h1><p class='meta'>MLflow run <code>{run_id}</code> · outcome "
             f"<b>{html.escape(s['outcome'])}</b> · data version <code>{html.escape(s['data']['version'])}</code> · "
             f"code <code>{html.escape(str(s['code']['git_commit'])[:10])}</code> · fingerprint "
             f"<code>{html.escape(s['fingerprint'])}</code></p>"]
    r = s.get("registry", {})
    parts.append(f"<p id='decision'>{'Registered ' + html.escape(str(r.get('model_name'))) + ' v' + str(r['version']) if r.get('version') else 'Nothing registered'}"
                 f": {html.escape(str(r.get('reason', '')))}</p>")
    parts += ["<h2>Training loss</h2>", _img("loss-plot", loss_plot(f["curves"]), "train/val loss, QLoRA vs LoRA")]
    acc = accuracy_frame(f)
    level = stats.level(float(f["params"].get("gates.confidence", 0.95)))
    parts += ["<h2>Accuracy</h2>", _img("accuracy-plot", accuracy_plot(acc, level), f"{acc['metric'].iloc[0]} per model with {level} intervals"),
              acc.round(4).to_html(table_id="accuracy-table", **table)]
    parts += ["<h2>Gates</h2>", gate_frame(f["gates"], level).to_html(table_id="gate-table", **table),
              "<ul>" + "".join(f"<li>{html.escape(g['name'])}: {html.escape(g['detail'])}</li>" for g in f["gates"]) + "</ul>"]
    if s.get("power"):
        parts.append(f"<p class='note'>{html.escape(s['power'])}</p>")
    parts += scored_sections(f, table)
    tuned = "merged" if "merged" in f["predictions"] else "qlora"
    preds = f["predictions"][tuned]
    refs = [p["reference"] for p in preds]
    if is_label_task(refs, f.get("labels")):
        cm, per = confusion(refs, [p["prediction"] for p in preds], f.get("labels"))
        parts += [f"<h2>Per-class accuracy ({tuned})</h2>", per.to_html(table_id="per-class-table", **table),
                  _img("confusion-matrix", confusion_plot(cm, f"Confusion matrix ({tuned})"), "confusion matrix")]
    rows, tuned = sample_rows(f)
    parts += [f"<h2>Test rows, worst first (base vs {tuned})</h2>", rows.to_html(table_id="rows-table", **table)]
    stages = stage_table(s["stage_seconds"], s.get("stage_peak_mb") or
                         {f"ms.{k}": v for k, v in (f["model_stage"].get("stage_peak_mb") or {}).items()})
    parts += ["<h2>Time and peak memory per stage</h2>", stages.to_html(table_id="stage-table", **table)]
    parts += ["<h2>Data vs the champion's run</h2>", data_frame(f).to_html(table_id="data-table", border=0, classes="t")]
    if (ch := f.get("champion")) and ch.get("error"):
        parts.append(f"<p class='note'>champion v{ch['version']}: {html.escape(ch['error'])}</p>")
    parts += serving_html(f.get("serving"))
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:24px auto;color:#222}"
             "table.t{border-collapse:collapse;font-size:13px;margin:8px 0}"
             ".t td,.t th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}"
             ".t th{background:#f3f3f3}.meta,.note{color:#555;font-size:13px}img{max-width:100%}h2{margin-top:28px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>qlora-ops run {run_id}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def scored_sections(f: dict, table: dict) -> list[str]:
    """Free-text gate metric: every metric's means, per-model score distributions, and the rows QLoRA lost
    most to LoRA and to the base side by side. Any run with suites: one table per suite."""
    from qlora_ops.tasks import metrics as M
    from qlora_ops.tasks.report import scores as rs

    parts, metric = [], rs.gate_metric(f)
    if not M.get(metric).binary:
        m = M.get(metric)
        parts += [f"<h2>Scores ({html.escape(metric)}: the gate metric)</h2>",
                  f"<p class='note'>{html.escape(metric)}: {html.escape(m.doc)}</p>",
                  rs.score_table(f["summary"]["models"]).round(4).to_html(table_id="score-table", **table)]
        if (png := rs.distribution_plot(f["predictions"], metric)):
            parts.append(_img("score-distributions", png, f"per-row {metric} per model"))
        for against, title in (("lora", "the LoRA baseline"), ("base", "the base model")):
            lost = rs.lost_rows(f, metric, against)
            parts += [f"<h2>Rows where QLoRA lost most to {title} ({html.escape(metric)})</h2>",
                      lost.to_html(table_id=f"lost-to-{against}-table", **table) if len(lost)
                      else f"<p class='note'>QLoRA lost no row to {title}.</p>"]
    suites = rs.suite_tables(f["summary"], f["gates"])
    if suites:
        parts.append("<h2>Suites</h2>")
        for name, head, df in suites:
            parts += [f"<h3>{html.escape(head)}</h3>", df.round(4).to_html(table_id=f"suite-{html.escape(name)}-table", **table)]
    return parts


def build_report(run_id: str, out_dir: Path) -> Path:
    """Write out_dir/report.html (and MODEL_CARD.md when the run registered a version); returns the report path."""
    from qlora_ops.tasks.core.util import atomic_write_text

    f = gather(run_id)
    out_dir = Path(out_dir)
    path = out_dir / "report.html"
    atomic_write_text(path, render_html(f))
    r = f["summary"].get("registry", {})
    if r.get("version"):
        card = model_card(f["summary"], f["params"], f.get("labels"), r)
        atomic_write_text(out_dir / "MODEL_CARD.md", with_serving(card, f.get("serving")))
    return path


def publish(run_id: str, out_dir: Path, model_name: str | None = None, version: int | None = None) -> Path:
    """Build the report (+ card), log them on the run under `report/`, and point the registered version
    at the report (tag `report_uri`). Returns the local report path."""
    from mlflow.tracking import MlflowClient

    path = build_report(run_id, out_dir)
    c = MlflowClient()
    for p in (path, path.with_name("MODEL_CARD.md")):
        if p.is_file():
            c.log_artifact(run_id, str(p), "report")
    if model_name and version:
        # After `status=ready`: the report is a view of the decision, not part of it.
        c.set_model_version_tag(model_name, str(version), "report_uri", report_uri(run_id))
    return path


# ---------------------------------------------------------------- serving and GGUF (serve engineer)
# Facts that arrive after the run: `qlora-ops verify-serving` and `export-gguf` write tags on the version
# and serving/parity.json, gguf/export.json on its run; a rebuilt report (`qlora-ops report RUN_ID`) shows them.

def serving_facts(c, model_name: str | None, summary: dict, run_id: str) -> dict | None:
    """The registered version's digest, evaluated metric, served metric and agreement (when checked) and
    GGUF agreement (when exported); None when the run registered nothing."""
    v = (summary.get("registry") or {}).get("version")
    if not (model_name and v):
        return None
    try:
        tags = dict(c.get_model_version(model_name, str(v)).tags or {})
    except Exception as e:  # a deleted version: the report says so instead of failing
        return {"version": v, "error": f"{type(e).__name__}: {e}"[:300]}
    merged = (summary.get("models") or {}).get("merged", {})
    metric = merged.get("metric") or "exact_match"
    out = {"version": v, "weights_digest": tags.get("weights_digest"), "tags": tags, "metric": metric,
           "evaluated": (merged.get("metrics") or {}).get(metric, merged.get("accuracy"))}
    for key, path in (("parity", "serving/parity.json"), ("gguf", "gguf/export.json")):
        try:
            out[key] = _load_json(run_id, path)
        except Exception:
            out[key] = None
    return out


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


def serving_html(s: dict | None) -> list[str]:
    import pandas as pd

    if not s:
        return []
    if s.get("error"):
        return [f"<p class='note'>v{s['version']}: {html.escape(s['error'])}</p>"]
    rows = serving_rows(s)
    note = "" if s.get("parity") else "<p class='note'>not checked on a live endpoint yet: qlora-ops verify-serving URL --version " \
                                      f"{s['version']}</p>"
    return ["<h2>Serving and GGUF (agreement with the evaluated answers)</h2>",
            pd.DataFrame(rows).to_html(table_id="serving-table", index=False, border=0, classes="t"), note]


def with_serving(card: str, s: dict | None) -> str:
    """The card with its serving section (before the 5000-character cut's note, if any). Only facts that
    arrive after the run (a live endpoint checked, a GGUF exported) add it: until then the card stays
    exactly the description written at registration."""
    import pandas as pd

    rows = serving_rows(s)
    if not rows or not (s.get("parity") or s.get("gguf")):
        return card
    section = "\n## Serving and GGUF\n\n" + _md(pd.DataFrame(rows)) + "\n"
    text = card.rstrip("\n") + "\n" + section
    if len(text) > CARD_LIMIT:  # the serving facts stay; the card's tail gives way
        note = f"\n\n(card cut at {CARD_LIMIT} characters; the full card is the run's `{CARD}`)\n"
        text = card[:CARD_LIMIT - len(section) - len(note)] + note + section
    return text
