"""`qlora-ops report [RUN_ID]`, and the same rebuild after verify-serving / export-gguf recorded more on a
version (refresh_report)."""
from __future__ import annotations

from pathlib import Path

from qlora_ops.flows.cli.exit_codes import fail
from qlora_ops.flows.cli.preflight import preflight
from qlora_ops.tasks.core.paths import state_dir
from qlora_ops.tasks.report.gather import ReportError, newest_run


def report_command(a) -> int:
    """`report [RUN_ID]`: the run's report and model card rebuilt from its MLflow record alone."""
    # MLflow, and pandas / scipy through the report: seconds that only the commands using them pay.
    import mlflow

    from qlora_ops.tasks.report.html import build_report

    if isinstance(pre := preflight(a), int):
        return pre
    ws, params, uri = pre
    mlflow.set_tracking_uri(uri)
    try:
        run_id = a.run_id or newest_run(params.registry.experiment)
        path = build_report(run_id, Path(a.out) if a.out else state_dir(ws, params) / "reports" / run_id)
    except ReportError as e:
        return fail("bad_input", e)
    print(f"report: {path}")
    if path.with_name("MODEL_CARD.md").is_file():
        print(f"model card: {path.with_name('MODEL_CARD.md')}")
    return 0


def refresh_report(ws: Path, params, run_id: str, model_name: str, v: int) -> None:
    """The run's report and the version's card rebuilt with what was just recorded (served metric and
    agreement, GGUF agreement); a failure is one warning line: the check's result is already recorded."""
    from mlflow.tracking import MlflowClient

    # pandas and scipy: not at `qlora-ops --help`
    from qlora_ops.tasks.report.card import CARD_LIMIT
    from qlora_ops.tasks.report.html import publish

    try:
        path = publish(run_id, state_dir(ws, params) / "reports" / run_id, model_name, v)
        if (card := path.with_name("MODEL_CARD.md")).is_file():
            MlflowClient().update_model_version(model_name, str(v), description=card.read_text()[:CARD_LIMIT])
        print(f"report: {path}")
    except Exception as e:
        print(f"warning: report not rebuilt ({type(e).__name__}: {str(e)[:200]}); `qlora-ops report {run_id}` rebuilds it")
