"""The report's free-text and suite parts (tasks/report/scores.py, report.scored_sections) from rows alone."""
from __future__ import annotations

from qlora_ops.tasks.report import html as report
from qlora_ops.tasks.report import scores as rs
from qlora_ops.tasks.report.card import model_card
from qlora_ops.tasks.report.frames import accuracy_frame

REFS = ["Read the file.", "Close the socket.", "Parse the query.", "Set the flag."]
ANSWERS = {  # model -> (answers, rouge_l, nll) per row
    "base": (["It reads.", "Close the socket.", "x", "Sets a flag"], [0.4, 1.0, 0.0, 0.5], [2.0, 0.5, 3.0, 1.0]),
    "lora": (["Read the file.", "Close the socket.", "Parse the query.", "Set it."], [1.0, 1.0, 1.0, 0.4], [0.2, 0.3, 0.4, 1.5]),
    "qlora": (["Read a file.", "Close.", "Parse the query.", "Set the flag."], [0.6, 0.5, 1.0, 1.0], [0.6, 0.9, 0.4, 0.2]),
    "merged": (["Read a file.", "Close.", "Parse the query.", "Set the flag."], [0.6, 0.5, 1.0, 1.0], [0.6, 0.9, 0.4, 0.2]),
}


def run(metric="rouge_l", old=False, suites=None) -> dict:
    preds = {}
    for m, (ans, rouge, nll) in ANSWERS.items():
        preds[m] = [{"id": f"r{i}", "reference": REFS[i], "prediction": a, "stopped": True, "new_tokens": 3,
                     "correct": a == REFS[i], **({} if old else {"scores": {"rouge_l": rouge[i], "nll": nll[i],
                                                                            "exact_match": float(a == REFS[i])}})}
                    for i, a in enumerate(ans)]
    models = {m: {"n": 4, "accuracy": sum(r["correct"] for r in p) / 4, "eos_rate": 1.0,
                  **({} if old else {"metric": metric, "metrics": {metric: 0.5, "exact_match": 0.25}})} for m, p in preds.items()}
    return {"params": {} if old else {"eval.metric": metric}, "predictions": preds, "gates": [],
            "test": {f"r{i}": {"prompt": f"prompt\n{i}"} for i in range(4)},
            "summary": {"models": models, **({"suites": suites} if suites else {})}}


def test_lost_rows_in_the_metrics_direction():
    f = run()
    lost = rs.lost_rows(f, "rouge_l", "lora")
    assert list(lost["id"]) == ["r1", "r0"] and list(lost["lost"]) == [0.5, 0.4]  # worst first; only rows QLoRA lost
    assert list(lost.columns[:7]) == ["id", "prompt", "reference", "base", "LoRA", "QLoRA", "merged"]
    assert lost.iloc[0]["LoRA"] == "Close the socket." and lost.iloc[0]["QLoRA"] == "Close." and lost.iloc[0]["prompt"] == "prompt 1"
    assert list(rs.lost_rows(f, "rouge_l", "base")["id"]) == ["r1"]
    # nll: lower is better, so QLoRA lost where its nll is HIGHER than LoRA's
    assert list(rs.lost_rows(f, "nll", "lora")["id"]) == ["r1", "r0"]
    assert list(rs.lost_rows(f, "nll", "base")["id"]) == ["r1"]


def test_old_runs_without_scores_still_report():
    f = run(old=True)
    assert rs.gate_metric(f) == "exact_match" and rs.row_score(f["predictions"]["qlora"][2], "exact_match") == 1.0
    assert rs.row_score(f["predictions"]["qlora"][2], "rouge_l") is None
    assert report.scored_sections(f, {}) == []  # exact match run: the label-task report as before, nothing added
    assert list(rs.score_table(f["summary"]["models"]).columns) == ["model", "exact_match", "n"]


def test_scored_sections_render_distributions_lost_rows_and_suites():
    suites = {"general": {"metric": "chrf", "role": "non_inferior", "threshold": 0.02,
                          "models": {"base": {"n": 10, "metrics": {"chrf": 0.41}}, "qlora": {"n": 10, "metrics": {"chrf": 0.35}}}}}
    f = run(suites=suites)
    f["gates"] = [{"name": "general:non_inferior", "suite": "general", "passed": False}]
    html = "".join(report.scored_sections(f, dict(index=False, border=0)))
    assert "Scores (rouge_l: the gate metric)" in html and 'id="score-distributions"' in html
    assert 'id="lost-to-lora-table"' in html and 'id="lost-to-base-table"' in html and "Close the socket." in html
    assert "general: non_inferior on chrf (threshold 0.02) - general:non_inferior FAIL" in html and "0.35" in html
    assert "Suites" not in "".join(report.scored_sections(run(), {}))  # no suites: no suite section


def test_model_card_names_the_gate_metric_and_lists_suites():
    gates = [{"name": "general:non_inferior", "suite": "general", "value": -0.06, "op": ">=", "threshold": -0.02,
              "passed": False, "detail": "", "ci_low": None, "ci_high": None, "ci_of": "value", "decided_on": "point estimate"}]
    m = {"accuracy": 0.05, "ci_low": 0.01, "ci_high": 0.1, "eos_rate": 1.0, "n": 4, "metric": "rouge_l",
         "metrics": {"rouge_l": 0.4123, "exact_match": 0.05}}
    summary = {"mlflow_run_id": "r1", "models": {"base": m, "qlora": m, "merged": m}, "gates": gates, "fingerprint": "fp",
               "code": {"git_commit": "abc", "source_sha": "s"}, "data": {"version": "dv", "stage": "prepare-x", "stats": {}},
               "suites": {"general": {"metric": "chrf", "role": "non_inferior", "threshold": 0.02,
                                      "models": {"base": {"n": 10, "metrics": {"chrf": 0.41}}}}}}
    card = model_card(summary, {"eval.metric": "rouge_l", "registry.model_name": "m"}, None,
                      {"version": 1, "promoted": True, "reason": "ok"})
    assert "rouge_l (the gate metric)" in card and "0.4123" in card and "gated on rouge_l: ROUGE-L" in card
    assert "## Suites" in card and "general: non_inferior on chrf (threshold 0.02) - general:non_inferior FAIL" in card
    assert "Guards against the champion" not in card
    # the guards a promotion decision checked against the champion (suites, classes): on the card, each verdict
    guard = {**gates[0], "name": "class os:non_inferior_vs_champion", "detail": "class 'os' recall (40 rows) ...",
             "ci_low": -0.31, "ci_high": -0.12, "p_value": 0.001}
    card = model_card({**summary, "promotion_guards": [guard]}, {"eval.metric": "rouge_l", "registry.model_name": "m"},
                      None, {"version": 1, "promoted": False, "reason": "keep champion: class os ..."})
    assert "Guards against the champion (1; promotion needs every one)" in card
    assert "class os:non_inferior_vs_champion" in card and "[-0.310, -0.120]" in card


def test_the_accuracy_section_plots_the_gate_metric_at_the_runs_confidence():
    """A free-text run's model table and plot show the gate metric with its interval (the one
    verdict.with_intervals computed), labelled at gates.confidence, not accuracy under a fixed "95%"."""
    f = run()
    for m, (_, rouge, _) in ANSWERS.items():
        f["summary"]["models"][m].update(score=sum(rouge) / 4, ci_low=0.1, ci_high=0.9)
    f["params"]["gates.confidence"] = "0.9"
    acc = accuracy_frame(f)
    assert list(acc["score"]) == [sum(ANSWERS[m][1]) / 4 for m in acc["model"]] and set(acc["metric"]) == {"rouge_l"}
    f["champion"] = {"version": 3, "correct": [False] * 4, "scores": {"rouge_l": [0.2, 0.4, 0.6, 0.8]}}
    ch = accuracy_frame(f).iloc[-1]
    assert ch["model"] == "champion v3" and abs(ch["score"] - 0.5) < 1e-9 and ch["ci_low"] < 0.5 < ch["ci_high"]
    card = model_card({**f["summary"], "mlflow_run_id": "r", "data": {"version": "d", "stage": "s"},
                       "code": {"git_commit": "c", "source_sha": "s"}, "fingerprint": "f", "gates": []},
                      f["params"], None, {"version": 1, "promoted": True, "reason": "x"})
    assert "90% interval" in card and "95%" not in card


def test_the_distribution_plots_title_clears_the_panels_titles():
    """Seen in Chromium on a free-text run: the figure's title was drawn over the panels' own titles."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = rs.distribution_figure(run()["predictions"], "rouge_l")
    FigureCanvasAgg(fig).draw()
    r = fig.canvas.get_renderer()
    top = fig._suptitle.get_window_extent(r)
    for ax in fig.axes:
        t = ax.title.get_window_extent(r)
        assert t.y1 <= top.y0, (ax.get_title(), t, top)  # each panel title wholly below the figure's title
        assert ax.get_window_extent(r).y1 <= top.y0


def test_the_card_and_the_report_show_the_lineage_and_the_contamination_count():
    """Issue 25: the contamination count (test rows near-duplicating rows ever trained on) and the test-set
    lineage were in the summary only."""
    from qlora_ops.tasks.report.frames import data_frame

    f = run()
    f["summary"]["data"] = {"version": "dv", "stage": "prepare-x",
                            "stats": {"train": 80, "val": 10, "test": 4, "lineage": 2, "contamination": 0,
                                      "near_duplicate_rows": 3}}
    col = data_frame(f)["this run"]
    assert col["test-set lineage"] == 2 and col["contamination"] == 0 and col["near-duplicate rows"] == 3
    card = model_card({**f["summary"], "mlflow_run_id": "r", "code": {"git_commit": "c", "source_sha": "s"},
                       "fingerprint": "f", "gates": []}, f["params"], None, {"version": 1, "promoted": True, "reason": "x"})
    assert "test-set lineage 2, contamination 0" in card and "near-duplicate rows 3" in card


def test_the_report_shows_the_data_card_the_lineage_restart_and_the_guards():
    """The HTML report (rendered from rows alone) carries the data card's lines, the restart of comparisons on a
    new test-set lineage and each guard against the champion."""
    import warnings

    f = run()
    f.update(run_id="r1", curves={}, labels=None, model_stage={}, champion=None)
    guard = {"name": "class os:non_inferior_vs_champion", "value": -0.2, "op": ">=", "threshold": -0.1, "passed": False,
             "detail": "class 'os' recall (40 rows) ...", "ci_low": -0.31, "ci_high": -0.12, "ci_of": "value",
             "p_value": 0.001, "decided_on": "interval lower bound"}
    f["summary"].update(
        outcome="registered", fingerprint="fp", code={"git_commit": "abc", "source_sha": "s"},
        registry={"version": 2, "model_name": "m", "reason": "keep champion"}, stage_seconds={"total": 1.0},
        data={"version": "dv2", "stage": "prepare", "stats": {"train": 8, "val": 2, "test": 4, "lineage": 2,
                                                               "contamination": 0, "near_duplicate_rows": 1},
              "diff": {"version": "dv2", "first": True}},
        lineage_restart="test-set lineage 2 is new to champion v1 (decided on lineage 1): comparisons with the "
                        "champion restart on these test rows", promotion_guards=[guard])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an empty loss plot's legend
        page = report.render_html(f)
    assert "<h2>Data changes</h2>" in page and "first data version (dv2)" in page
    assert "comparisons with the champion restart" in page
    assert "Guards against the champion" in page and "class os:non_inferior_vs_champion" in page
