"""The run report and the model card of one tiny-model run, against a real MLflow and Prefect server.

The page is checked as headless Chromium renders it (its dumped DOM, not our Python string): the loss
plot, the accuracy plot, the gate table and the confusion matrix are there and the images decode as
PNGs. `qlora-ops report RUN_ID` rebuilds it through the real CLI from MLflow alone, and the registered
version's description is the model card. A report that cannot be written never changes the outcome.
"""
from __future__ import annotations

import base64
import io
import subprocess
import sys
import uuid
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.conftest import make_workspace, start_prefect_server
from tests.integration.test_flow import write_params

pytestmark = pytest.mark.slow

CHROMIUM = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class Dom(HTMLParser):
    """img id -> src, table id -> its text, from the DOM Chromium dumps."""

    def __init__(self):
        super().__init__()
        self.imgs, self.tables, self._table = {}, {}, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img" and a.get("id"):
            self.imgs[a["id"]] = a.get("src", "")
        if tag == "table" and a.get("id"):
            self._table = a["id"]
            self.tables[self._table] = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._table:
            self.tables[self._table] += data + " "


def rendered(page: Path, tmp: Path) -> Dom:
    r = subprocess.run([*CHROMIUM, f"--user-data-dir={tmp / 'chromium'}", "--dump-dom", page.resolve().as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = Dom()
    dom.feed(r.stdout)
    return dom


def assert_png(src: str) -> None:
    from PIL import Image

    head = "data:image/png;base64,"
    assert src.startswith(head), src[:60]
    raw = base64.b64decode(src[len(head):])
    img = Image.open(io.BytesIO(raw))
    assert img.format == "PNG" and img.width > 100 and img.height > 100
    assert len(set(img.convert("L").getdata())) > 2  # not a blank canvas


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, mlflow_server):
    """One tiny run, registered (lax gates): its workspace, params file, summary."""
    ws = make_workspace(tmp_path_factory.mktemp("ws") / "repo")
    name = f"report-{uuid.uuid4().hex[:6]}"
    rel = write_params(ws, "rep", tiny_model_dir, mlflow_server, name)
    with start_prefect_server(tmp_path_factory.mktemp("prefect") / "home") as server:
        with server.settings():
            from qlora_ops.flows.retrain import retrain

            s = retrain(params_path=rel, workspace=str(ws))
            yield {"ws": ws, "rel": rel, "summary": s, "name": name, "prefect": server}


@pytest.fixture(autouse=True)
def _restore_mlflow_env(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # the flow's set_tracking_uri writes it into os.environ
    monkeypatch.delenv("MLFLOW_TRACKING_URI")


def test_report_renders_in_chromium_and_card_is_the_version_description(run, mlflow_server, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    s, run_id = run["summary"], run["summary"]["mlflow_run_id"]
    assert s["outcome"] == "registered" and s["report"]
    page = Path(s["report"])
    dom = rendered(page, tmp_path)
    for img in ("loss-plot", "accuracy-plot", "confusion-matrix"):
        assert_png(dom.imgs[img])
    gates = dom.tables["gate-table"]
    for g in ("gain_over_base", "retention_vs_lora", "merge_disagreement"):
        assert g in gates
    assert "PASS" in gates
    assert {"accuracy-table", "per-class-table", "rows-table", "stage-table", "data-table"} <= set(dom.tables)
    assert "model_stage" in dom.tables["stage-table"] and s["data"]["version"] in dom.tables["data-table"]

    c = MlflowClient(mlflow_server)
    v = c.get_model_version(run["name"], str(s["registry"]["version"]))
    assert v.tags["report_uri"] == f"runs:/{run_id}/report/report.html"
    mlflow.set_tracking_uri(mlflow_server)
    logged = mlflow.artifacts.load_text(f"runs:/{run_id}/report/report.html")
    assert logged == page.read_text()
    card = mlflow.artifacts.load_text(f"runs:/{run_id}/report/MODEL_CARD.md")
    assert v.description == card  # written at registration (before status=ready) from the same renderer
    for part in ("## Metrics", "## Gates", "## Promotion", "## Intended use", "## Limits", "QLoRA",
                 f"Test set: {s['models']['qlora']['n']} rows", s["data"]["version"], "report_uri"):
        assert part in card, part


def test_cli_report_rebuilds_it_from_mlflow(run, mlflow_server, tmp_path):
    import mlflow

    from qlora_ops.tasks.report.gather import newest_run

    ws, s = run["ws"], run["summary"]
    run_id, out = s["mlflow_run_id"], tmp_path / "rebuilt"
    r = subprocess.run([sys.executable, "-m", "qlora_ops.flows.cli", "report", run_id, "--params", run["rel"],
                        "--workspace", str(ws), "--out", str(out)],
                       cwd=ws, env=run["prefect"].client_env(PYTHONPATH=str(ws)), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"report: {out / 'report.html'}" in r.stdout
    dom = rendered(out / "report.html", tmp_path)
    for img in ("loss-plot", "accuracy-plot", "confusion-matrix"):
        assert_png(dom.imgs[img])
    assert "gain_over_base" in dom.tables["gate-table"] and run_id in (out / "report.html").read_text()
    assert (out / "MODEL_CARD.md").read_text() == Path(s["report"]).with_name("MODEL_CARD.md").read_text()
    mlflow.set_tracking_uri(mlflow_server)
    assert newest_run(f"exp-{run['name']}") == run_id  # what `qlora-ops report` with no RUN_ID rebuilds


def test_report_failure_never_changes_the_outcome(run, caplog, mlflow_server, tmp_path):
    from qlora_ops.flows.retrain import retrain

    reports = run["ws"] / ".qlora-ops" / "reports"  # holds the first run's report
    aside = reports.with_name("reports-aside")
    reports.rename(aside)
    reports.write_text("a file where the reports directory goes\n")  # a real write fault, not a mock
    try:
        with run["prefect"].settings():
            st = retrain(params_path=run["rel"], workspace=str(run["ws"]), force=True, return_state=True)
    finally:
        reports.unlink()
        aside.rename(reports)
    s = st.result()
    assert st.is_completed() and st.name != "Rejected" and s["outcome"] == "registered", (st.name, st.message)
    assert s["registry"]["version"] == run["summary"]["registry"]["version"] + 1 and s["report"] is None
    # In-process, Prefect's log_prints turns the flow's prints into records of its run logger.
    warns = [r.getMessage() for r in caplog.records if "warning: run report not written" in r.getMessage()]
    assert len(warns) == 1 and f"qlora-ops report {s['mlflow_run_id']}" in warns[0]

    # What the warning says works: rebuilt from MLflow, now with the champion it was compared with.
    import mlflow

    from qlora_ops.tasks.report import html as report

    mlflow.set_tracking_uri(mlflow_server)
    page = report.build_report(s["mlflow_run_id"], tmp_path / "later")
    dom = rendered(page, tmp_path)
    v1 = run["summary"]["registry"]["version"]
    assert f"champion v{v1}" in dom.tables["accuracy-table"] and f"champion v{v1}'s run" in dom.tables["data-table"]
    assert_png(dom.imgs["accuracy-plot"])
    assert "Not promoted" in (tmp_path / "later" / "MODEL_CARD.md").read_text()
