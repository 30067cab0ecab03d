"""The model card (markdown) of a registered version.

It is written twice from one renderer: at registration time from the summary the run is about to log
(flows/retrain.py: `model_card(summary, params, labels, decision)` becomes the version's description),
and by html.build_report from the run's MLflow record (gather.py) as the `report/MODEL_CARD.md`
artifact, then with the serving/GGUF facts that arrive later (`with_serving`).
"""
from __future__ import annotations

from qlora_ops.tasks import metrics as M
from qlora_ops.tasks.data.diff import card_lines
from qlora_ops.tasks.gates import paired
from qlora_ops.tasks.report.frames import gate_frame, ordered, serving_rows
from qlora_ops.tasks.report.gather import report_uri
from qlora_ops.tasks.report.scores import suite_tables

CARD = "report/MODEL_CARD.md"
CARD_LIMIT = 5000  # MLflow's model-version description column (String(5000) on SQL stores)


def _md(df) -> str:
    return df.to_markdown(index=False)


def model_card(summary: dict, params: dict[str, str], labels: list[str] | None, decision: dict) -> str:
    """Markdown card of a registered version. `params`: the run's flat params (as MLflow logs them);
    `decision`: version, promoted, reason (tasks.registry.register's answer)."""
    import pandas as pd

    run_id, models, n = summary["mlflow_run_id"], summary["models"], summary["models"]["qlora"]["n"]
    st = summary["data"].get("stats", {})
    metric = params.get("eval.metric") or models["qlora"].get("metric") or "exact_match"
    gated = metric != "exact_match"  # a free-text run: its gate metric's mean beside exact match
    # The interval is the gate metric's (tasks/verdict.with_intervals), at the run's gates.confidence.
    level = paired.level(float(params.get("gates.confidence", 0.95)))
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
         + (f" (the first {n} test rows evaluated: eval.max_examples)" if st.get("test", n) != n else "")
         + (f"; test-set lineage {st['lineage']}, contamination {st['contamination']} (test rows near-duplicating "
            f"rows ever trained on: must be 0), near-duplicate rows {st.get('near_duplicate_rows', '?')}"
            if "contamination" in st else ""),
         f"- code {str(summary['code']['git_commit'])[:10]} (source sha {summary['code']['source_sha']}), "
         f"fingerprint `{summary['fingerprint']}`", "",
         f"## Metrics (test split{f': {metric} (the gate metric) with its {level} bootstrap interval, and exact-match accuracy' if gated else f', exact-match accuracy, Wilson {level} interval'})",
         "", _md(acc), "",
         "## Gates", "", _md(gate_frame(summary["gates"], level)), "",
         *suite_card(summary),
         *data_changes_card(summary),
         "## Promotion", "", f"{'Promoted to champion' if decision['promoted'] else 'Not promoted'}: "
         f"{decision['reason']}", "",
         *([f"Decision ledger before this decision: {summary['decisions_before']}.", ""]
           if summary.get("decisions_before") else []),
         *([f"{summary['lineage_restart']}.", ""] if summary.get("lineage_restart") else []),
         *([f"Guards against the champion ({len(summary['promotion_guards'])}; promotion needs every one):", "",
            _md(gate_frame(summary["promotion_guards"], level)), ""] if summary.get("promotion_guards") else []),
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
        L.append(f"- Free-text answers (no label set); gated on {metric}: {M.get(metric).doc}. Accuracy is exact match.")
    text = "\n".join(L) + "\n"
    if len(text) > CARD_LIMIT:
        tail = f"\n\n(card cut at {CARD_LIMIT} characters; the full card is the run's `{CARD}`)\n"
        text = text[:CARD_LIMIT - len(tail)] + tail
    return text


def data_changes_card(summary: dict) -> list[str]:
    """The card's Data changes section: the data card's first four lines (the run's `data/data_card.json`
    holds all of it); nothing for a run recorded before data cards."""
    if not (d := summary["data"].get("diff")):
        return []
    return ["## Data changes", "", *[f"- {x.strip()}" for x in card_lines(d)[:4]], ""]


def suite_card(summary: dict) -> list[str]:
    """The card's Suites section (nothing when the run has no suites): each suite's mean per model."""
    tables = suite_tables(summary, summary.get("gates", []))
    if not tables:
        return []
    return ["## Suites", ""] + [x for _, head, df in tables for x in (f"{head}:", "", _md(df.round(4)), "")]


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
