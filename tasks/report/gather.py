"""What a run logged, read back from MLflow alone: the one place the report and the card get their facts.

    f = gather(run_id)            # summary.json, model_stage.json, gates.json, eval/<model>/predictions.jsonl,
                                  # the prepared test split, the train-qlora/train-lora child runs' loss curves,
                                  # the compared champion's version and run, the version's serving/GGUF facts
    newest_run(experiment)        # what `qlora-ops report` with no RUN_ID rebuilds

Also here: whether the answers are labels (`label_set`, `is_label_task`), and where the report lives
on the run (`report_uri`). frames.py, plots.py, html.py and card.py only format what `gather` returns.
"""
from __future__ import annotations

import json

REPORT = "report/report.html"  # where html.publish logs the page on the run; the card and the version's tag point here
MAX_CLASSES = 20   # more distinct answers than this is free text: no confusion matrix


def report_uri(run_id: str) -> str:
    return f"runs:/{run_id}/{REPORT}"


# ---------------------------------------------------------------- labels or free text (tests/code/test_report.py)

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
