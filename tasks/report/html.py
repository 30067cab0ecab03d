"""The run report: one self-contained HTML page (plots inlined as base64 PNG), and publishing it.

    qlora-ops report [RUN_ID]    # rebuilds the page and the card for any past run, from MLflow alone

    build_report(run_id, out_dir)    # gather.gather -> render_html -> out_dir/report.html (+ card.py's MODEL_CARD.md)
    publish(run_id, out_dir, ...)    # build_report, log both on the run under report/, tag the version's report_uri

The page only formats: its facts come from gather.py, its tables from frames.py and scores.py, its
figures from plots.py.
"""
from __future__ import annotations

import html
from pathlib import Path

from qlora_ops.tasks import metrics as M
from qlora_ops.tasks.core.util import atomic_write_text
from qlora_ops.tasks.data.diff import card_lines
from qlora_ops.tasks.gates import paired
from qlora_ops.tasks.report import scores as rs
from qlora_ops.tasks.report.card import model_card, with_serving
from qlora_ops.tasks.report.frames import (accuracy_frame, confusion, data_frame, gate_frame, macro_f1, ordered,
                                           recall_vs_champion, sample_rows, serving_rows, stage_table)
from qlora_ops.tasks.report.gather import gather, is_label_task, report_uri
from qlora_ops.tasks.report.plots import accuracy_plot, confusion_plot, loss_plot


def _img(id_: str, b64: str, alt: str) -> str:
    return f'<img id="{id_}" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _verdicts(title: str, verdicts: list[dict], table_id: str, level: str, table: dict) -> list[str]:
    """A heading, the verdicts' table (gate_frame) and each verdict's detail line."""
    return [f"<h2>{title}</h2>", gate_frame(verdicts, level).to_html(table_id=table_id, **table),
            "<ul>" + "".join(f"<li>{html.escape(g['name'])}: {html.escape(g['detail'])}</li>" for g in verdicts) + "</ul>"]


def render_html(f: dict) -> str:
    s, run_id = f["summary"], f["run_id"]
    table = dict(index=False, border=0, classes="t", na_rep="")
    parts = [f"<h1>qlora-ops run report</h1><p class='meta'>MLflow run <code>{run_id}</code> · outcome "
             f"<b>{html.escape(s['outcome'])}</b> · data version <code>{html.escape(s['data']['version'])}</code> · "
             f"code <code>{html.escape(str(s['code']['git_commit'])[:10])}</code> · fingerprint "
             f"<code>{html.escape(s['fingerprint'])}</code></p>"]
    r = s.get("registry", {})
    parts.append(f"<p id='decision'>{'Registered ' + html.escape(str(r.get('model_name'))) + ' v' + str(r['version']) if r.get('version') else 'Nothing registered'}"
                 f": {html.escape(str(r.get('reason', '')))}</p>")
    if s.get("lineage_restart"):
        parts.append(f"<p class='note' id='lineage-restart'>{html.escape(s['lineage_restart'])}</p>")
    parts += ["<h2>Training loss</h2>", _img("loss-plot", loss_plot(f["curves"]), "train/val loss, QLoRA vs LoRA")]
    acc = accuracy_frame(f)
    level = paired.level(float(f["params"].get("gates.confidence", 0.95)))
    parts += ["<h2>Accuracy</h2>", _img("accuracy-plot", accuracy_plot(acc, level), f"{acc['metric'].iloc[0]} per model with {level} intervals"),
              acc.round(4).to_html(table_id="accuracy-table", **table)]
    parts += _verdicts("Gates", f["gates"], "gate-table", level, table)
    if guards := s.get("promotion_guards"):  # guard suites and classes against the champion: promotion needs every one
        parts += _verdicts("Guards against the champion", guards, "guard-table", level, table)
    if s.get("power"):
        parts.append(f"<p class='note'>{html.escape(s['power'])}</p>")
    parts += scored_sections(f, table)
    tuned = "merged" if "merged" in f["predictions"] else "qlora"
    preds = f["predictions"][tuned]
    refs = [p["reference"] for p in preds]
    if is_label_task(refs, f.get("labels")):
        cm, per = confusion(refs, [p["prediction"] for p in preds], f.get("labels"))
        macro = {k: macro_f1(confusion([r["reference"] for r in rows], [r["prediction"] for r in rows], f.get("labels"))[1])
                 for k, rows in ordered(f["predictions"])}
        parts += [f"<h2>Per-class recall, precision and F1 ({tuned})</h2>",
                  "<p class='meta' id='macro-f1'>macro-F1 (every class weighs the same): "
                  + ", ".join(f"{html.escape(k)} {v:.4f}" for k, v in macro.items()) + "</p>",
                  per.to_html(table_id="per-class-table", **table),
                  *champion_recall(f, refs, [p["correct"] for p in preds], tuned, table),
                  _img("confusion-matrix", confusion_plot(cm, f"Confusion matrix ({tuned})"), "confusion matrix")]
    rows, tuned = sample_rows(f)
    parts += [f"<h2>Test rows, worst first (base vs {tuned})</h2>", rows.to_html(table_id="rows-table", **table)]
    stages = stage_table(s["stage_seconds"], s.get("stage_peak_mb") or
                         {f"ms.{k}": v for k, v in (f["model_stage"].get("stage_peak_mb") or {}).items()})
    parts += ["<h2>Time and peak memory per stage</h2>", stages.to_html(table_id="stage-table", **table)]
    parts += ["<h2>Data vs the champion's run</h2>", data_frame(f).to_html(table_id="data-table", border=0, classes="t")]
    if (ch := f.get("champion")) and ch.get("error"):
        parts.append(f"<p class='note'>champion v{ch['version']}: {html.escape(ch['error'])}</p>")
    if (d := s["data"].get("diff")):  # the data card (tasks/data/diff.py); runs before it have none
        parts += ["<h2>Data changes</h2>", f"<pre id='data-diff'>{html.escape(chr(10).join(card_lines(d)))}</pre>"]
    parts += serving_html(f.get("serving"))
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:24px auto;color:#222}"
             "table.t{border-collapse:collapse;font-size:13px;margin:8px 0}"
             ".t td,.t th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}"
             ".t th{background:#f3f3f3}.meta,.note{color:#555;font-size:13px}img{max-width:100%}h2{margin-top:28px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>qlora-ops run {run_id}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def champion_recall(f: dict, refs: list[str], correct: list[bool], tuned: str, table: dict) -> list[str]:
    """Per-class recall of the candidate beside the champion's on the same rows (when the champion's rows are
    saved for this test set): a class that lost ground shows even when accuracy rose."""
    ch = f.get("champion") or {}
    if not ch.get("correct") or len(ch["correct"]) != len(correct):
        return []
    per = recall_vs_champion(refs, correct, ch["correct"], f.get("labels"))
    return [f"<h3>Per-class recall, {tuned} vs champion v{ch['version']} (same rows)</h3>",
            per.to_html(table_id="per-class-champion-table", **table)]


def scored_sections(f: dict, table: dict) -> list[str]:
    """Free-text gate metric: every metric's means, per-model score distributions, and the rows QLoRA lost
    most to LoRA and to the base side by side. Any run with suites: one table per suite."""
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


def build_report(run_id: str, out_dir: Path) -> Path:
    """Write out_dir/report.html (and MODEL_CARD.md when the run registered a version); returns the report path."""
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
