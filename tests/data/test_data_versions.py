"""`qlora-ops data diff A B` and `qlora-ops data checkout --version N` on a real git + DVC workspace and a real
MLflow store (SQLite in the state dir), with two registered versions over two data versions.

No model is trained: each version's run is recorded as the flow records it (flows/retrain.py: the tags
`dvc.out.<path>`, the artifact `data/prepared`, the data card from `data_card`; the version tags
`mlflow_run_id` and `data_version`), so the data commands see what they see after real runs.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from qlora_ops.tasks.core.config import load_params
from qlora_ops.tasks.data.versioning import prepare_via_dvc
from tests.conftest import make_workspace

LABELS = ["json", "os", "re", "math"]
NAME = "dv-model"


def line(i: int, label: str | None = None, text: str | None = None) -> str:
    return json.dumps({"instruction": "Which module is this about?", "input": text or f"Item {i} is about "
                       f"{LABELS[i % 4]} things, number {i}.", "output": label or LABELS[i % 4]}) + "\n"


def record(ws: Path, params, data: dict, card: dict) -> str:
    """One version's run and registered version, tagged as the flow tags them; returns the run id."""
    from mlflow.tracking import MlflowClient

    from qlora_ops.tasks.core.paths import artifact_root
    from qlora_ops.tasks.registry import tracking

    exp = tracking.ensure_experiment(params.registry.experiment, artifact_root(ws, params).as_uri(), False)
    run_id = tracking.start_run(params, exp, run_name="dv", tags={
        "qlora_ops.data_version": data["data_version"], **{f"dvc.out.{k}": v for k, v in data["outs"].items()}})
    tracking.log_dir(run_id, Path(data["prepared_dir"]), "data/prepared")
    tracking.log_json(run_id, card, "data/data_card.json")
    tracking.end_run(run_id, "FINISHED")
    c = MlflowClient()
    if not c.search_registered_models(f"name = '{NAME}'"):
        c.create_registered_model(NAME)
    c.create_model_version(NAME, f"runs:/{run_id}/data", run_id=run_id,
                           tags={"mlflow_run_id": run_id, "data_version": data["data_version"]})
    return run_id


def cli(ws: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in __import__("os").environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "qlora_ops.flows.cli", "data", *args, "--params", "params/dv.yaml",
                           "--workspace", str(ws)], cwd=ws, env=env, capture_output=True, text=True, timeout=300)


def test_data_diff_and_a_verified_checkout_of_each_registered_version(tmp_path, monkeypatch):
    import mlflow

    from qlora_ops.flows.retrain import data_card, format_summary
    from qlora_ops.tasks.core.paths import tracking_uri

    ws = make_workspace(tmp_path / "ws")
    drops = tmp_path / "drops"
    drops.mkdir()
    (drops / "w1.jsonl").write_text("".join(line(i) for i in range(60)))
    p = ws / "params" / "dv.yaml"
    p.write_text(yaml.safe_dump({"data": {"source": str(drops), "raw": "data/raw/dv", "prepared": "data/prepared/dv"},
                                 "registry": {"model_name": NAME, "experiment": "dv"}}))
    params = load_params(p)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(tracking_uri(ws, params))  # the workspace's own SQLite store
    try:
        d1 = prepare_via_dvc(ws, p, params)
        card1 = data_card(ws, params, d1)
        assert card1 == {"version": d1["data_version"], "first": True}
        v1 = {f.name: f.read_bytes() for f in Path(d1["prepared_dir"]).iterdir()}
        record(ws, params, d1, card1)

        # the next drop: 20 new rows, 2 answers fixed (a corrections file), 1 row recased
        (drops / "w1.jsonl").write_text("".join(line(i, text=f"ITEM {i} IS ABOUT {LABELS[i % 4].upper()} THINGS NUMBER {i}")
                                                if i == 7 else line(i) for i in range(60)))
        (drops / "w2.jsonl").write_text("".join(line(i, label="json") for i in range(60, 80)))
        (drops / "fix.corrections.jsonl").write_text(line(1, label="re") + line(2, label="json"))
        d2 = prepare_via_dvc(ws, p, params)
        card2 = data_card(ws, params, d2)
        assert card2["previous"] == d1["data_version"] and card2["version"] == d2["data_version"]
        assert card2["all"] == {"added": 20, "removed": 0, "answer_changed": 2, "text_edited": 1, "unchanged": 57}
        assert card2["labels"]["new"]["json"] == 15 + 20 + 1 and card2["labels"]["psi"] > 0.1
        summary = {"data": {"diff": card2}, "outcome": "skipped", "reason": "x", "fingerprint": "f",
                   "stage_seconds": {}}
        summary["data"]["version"] = d2["data_version"]
        assert f"data version {d2['data_version']} vs {d1['data_version']}: rows 60 -> 80: +20 added" in format_summary(summary)
        record(ws, params, d2, card2)
    finally:
        mlflow.set_tracking_uri(None)

    r = cli(ws, "diff", "1", "2")
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == f"{NAME} v1 (data version {d1['data_version']}) -> v2 (data version {d2['data_version']})"
    assert out[1] == ("rows 60 -> 80: +20 added, -0 removed, 2 answers changed, 1 text edits (near-duplicate), "
                      "57 unchanged")
    assert any(ln.startswith("  labels (4 bins, one per label): chi-square p=") for ln in out)
    r = cli(ws, "diff", "2", "1", "--json")
    assert r.returncode == 0, r.stderr
    back = json.loads(r.stdout)
    assert back["from"]["version"] == 2 and back["diff"]["all"]["removed"] == 20
    assert cli(ws, "diff", "1", "9").returncode == 2  # no such version

    # v1's exact bytes, though the workspace now holds v2's data
    r = cli(ws, "checkout", "--version", "1")
    assert r.returncode == 0, r.stderr
    got = ws / ".qlora-ops" / "checkout" / "v1"
    assert {f.name: f.read_bytes() for f in got.iterdir()} == v1
    assert "4 files, each md5 checked against DVC's manifest and the run's MLflow copy" in r.stdout

    # v1's test split changed in the cache and in the remote: DVC delivers it, the checkout refuses it
    manifest_md5 = d1["outs"]["data/prepared/dv"]
    cache = ws / ".dvc" / "cache" / "files" / "md5"
    entries = json.loads((cache / manifest_md5[:2] / manifest_md5[2:]).read_text())
    test_md5 = next(e["md5"] for e in entries if e["relpath"] == "test.jsonl")
    for root in (cache, ws / ".qlora-ops" / "dvc-remote" / "files" / "md5"):
        f = root / test_md5[:2] / test_md5[2:]
        f.chmod(0o644)
        f.write_bytes(f.read_bytes() + line(999).encode())
    r = cli(ws, "checkout", "--version", "1", "--out", str(tmp_path / "tampered"))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "test.jsonl: md5 " in r.stderr and "does not match its manifest" in r.stderr, r.stderr
    assert not (tmp_path / "tampered").exists()
    assert not list(ws.glob(".qlora-ops-checkout-*"))  # the temporary .dvc folder is gone

    # the run's MLflow copy of v2 changed: DVC's bytes are fine, the two records disagree, refused
    v2_run = back["from"]["run_id"]
    logged = next((ws / ".qlora-ops" / "mlartifacts").glob(f"**/{v2_run}/artifacts/data/prepared/val.jsonl"))
    logged.write_text(logged.read_text() + line(998))
    r = cli(ws, "checkout", "--version", "2", "--out", str(tmp_path / "v2"))
    assert r.returncode == 2 and "MLflow copy" in r.stderr and "val.jsonl: md5 " in r.stderr, r.stderr


def test_a_data_diff_that_fails_is_one_line_and_the_run_goes_on(tmp_path, capsys):
    from qlora_ops.flows.retrain import data_card, format_summary

    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "p.yaml").write_text("seed: 1\n")
    params = load_params(tmp_path / "params" / "p.yaml")
    good, bad = tmp_path / "good", tmp_path / "bad"
    for d, text in ((good, line(1)), (bad, "{not json\n")):
        d.mkdir()
        (d / "train.jsonl").write_text(text)
    first = data_card(tmp_path, params, {"stage": "prepare", "data_version": "v1", "prepared_dir": str(good)})
    assert first == {"version": "v1", "first": True}
    card = data_card(tmp_path, params, {"stage": "prepare", "data_version": "v2", "prepared_dir": str(bad)})
    assert card["version"] == "v2" and card["error"].startswith("JSONDecodeError")
    assert "warning: data diff not computed (JSONDecodeError" in capsys.readouterr().out
    s = {"data": {"diff": card, "version": "v2"}, "outcome": "skipped", "reason": "x", "fingerprint": "f", "stage_seconds": {}}
    assert "data diff not computed: JSONDecodeError" in format_summary(s)
    # still remembered: the next version is diffed against it
    assert (tmp_path / ".qlora-ops" / "data-versions" / "prepare" / "v2" / "train.jsonl.gz").is_file()
