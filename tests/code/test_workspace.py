"""A workspace of your own (tasks/intake/workspace.py, flows/cli/workspace.py): init and adopt, the root found
from any folder inside, the DVC stages' dependency outside the clone, the upgrade notes."""
from __future__ import annotations

import json
import subprocess
from argparse import Namespace
from pathlib import Path

import yaml

from qlora_ops.flows.cli.workspace import resolve
from qlora_ops.tasks.data import workspace_file
from qlora_ops.tasks.data.versioning import ensure_stage
from qlora_ops.tasks.core.config import load_params
from qlora_ops.tasks.intake import workspace

ROOT = Path(__file__).resolve().parents[2]


def test_init_makes_a_git_and_dvc_workspace_whose_stages_depend_on_the_marker(tmp_path):
    d = tmp_path / "ws"
    done = workspace.init(d)
    assert any(x.startswith("git init") for x in done) and any(x.startswith("dvc init") for x in done)
    for f in (".git", ".dvc/config", "params/default.yaml", "params/free-text.yaml", "dvc.yaml", ".gitignore",
              "README.md", workspace_file.MARKER):
        assert (d / f).exists(), f
    assert (d / "params/default.yaml").read_bytes() == (ROOT / "params/default.yaml").read_bytes()
    assert "analytics = false" in (d / ".dvc/config").read_text()
    stages = yaml.safe_load((d / "dvc.yaml").read_text())["stages"]
    assert {"sample", "prepare", "sample-free-text", "prepare-free-text"} <= set(stages)
    for s in stages.values():  # no tasks/... file exists here: the marker stands for the code
        assert workspace_file.MARKER in s["deps"] and not any(x.startswith("tasks/") for x in s["deps"])
    assert workspace_file.read_marker(d)["data_code"] == workspace_file.data_code()
    assert ".qlora-ops/" in (d / ".gitignore").read_text().splitlines()
    # a params file's own stage, added on the first run, depends on the marker too
    (d / "params/mine.yaml").write_text("data: {raw: data/raw/stdlib_docstrings.jsonl, prepared: data/prepared/mine}\n")
    name = ensure_stage(d, d / "params/mine.yaml", load_params(d / "params/mine.yaml"))
    deps = yaml.safe_load((d / "dvc.yaml").read_text())["stages"][name]["deps"]
    assert workspace_file.MARKER in deps and not any(x.startswith("tasks/") for x in deps)
    assert workspace.init(d) == []  # again: nothing to add


def test_adopting_a_git_repo_keeps_its_files(tmp_path):
    d = tmp_path / "theirs"
    d.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=d, check=True)
    (d / ".gitignore").write_text("node_modules/\n")
    (d / "params").mkdir()
    (d / "params/default.yaml").write_text("seed: 7\n")
    done = workspace.init(d)
    assert "git init" not in done
    assert (d / "params/default.yaml").read_text() == "seed: 7\n"  # theirs, not replaced
    assert (d / ".gitignore").read_text().splitlines()[0] == "node_modules/"
    assert ".qlora-ops/" in (d / ".gitignore").read_text().splitlines()


def test_the_clone_keeps_its_code_deps():
    assert workspace_file.is_source_tree(ROOT)
    assert workspace_file.stage_deps(ROOT) == workspace_file.CLONE_DEPS
    assert workspace.find_root(ROOT / "tasks" / "data") == ROOT


def test_every_command_finds_the_root_from_a_subfolder(tmp_path, monkeypatch):
    d = tmp_path / "ws"
    (d / "data" / "raw").mkdir(parents=True)
    (d / workspace_file.MARKER).write_text("workspace: 1\n")
    (d / "params").mkdir()
    (d / "params" / "mine.yaml").write_text("seed: 1\n")
    monkeypatch.chdir(d / "data" / "raw")
    a = Namespace(workspace=".", params="params/default.yaml")
    resolve(a)
    assert (a.workspace, a.params) == (str(d), "params/default.yaml")
    a = Namespace(workspace=".", params="../../params/mine.yaml")  # relative to here: made workspace-relative
    resolve(a)
    assert a.params == "params/mine.yaml"
    a = Namespace(workspace="/elsewhere", params="params/default.yaml")  # named: kept
    resolve(a)
    assert a.workspace == "/elsewhere"
    monkeypatch.chdir(tmp_path)  # no workspace above: the current directory, as before
    a = Namespace(workspace=".", params="params/default.yaml")
    resolve(a)
    assert a.workspace == "."


def _last(root: Path, **changed) -> None:
    rec = {**workspace.current(), "at": "2026-12-01T00:00:00Z", **changed}
    (root / ".qlora-ops").mkdir(parents=True, exist_ok=True)
    (root / workspace.RECORD).write_text(json.dumps(rec) + "\n")


def test_upgrade_notes_say_whether_the_upgrade_retrains(tmp_path):
    assert workspace.upgrade_notes(tmp_path) == []  # no run yet
    workspace.record_run(tmp_path, "Completed", "params/default.yaml")
    assert workspace.upgrade_notes(tmp_path) == []  # the same qlora-ops
    _last(tmp_path, qlora_ops="0.0.9")  # a release that changed nothing deciding
    notes = "\n".join(workspace.upgrade_notes(tmp_path))
    assert "last run by 0.0.9" in notes and "no retraining" in notes and "RETRAINS" not in notes
    _last(tmp_path, qlora_ops="0.0.9", decision_code="0" * 16, lock_hash="1" * 16, data_code="2" * 16)
    notes = "\n".join(workspace.upgrade_notes(tmp_path))
    assert "RETRAINS" in notes and "decides the model" in notes and "dependency lock changed" in notes
    assert "re-runs the prepare stages" in notes


def test_deployments_of_a_workspace_name_the_installed_module(tmp_path):
    from prefect.utilities.importtools import import_object

    from qlora_ops.flows.deploy import entrypoint

    assert entrypoint(ROOT, "retrain") == "flows/retrain.py:retrain"  # the clone: the worker's checkout, as before
    (tmp_path / workspace_file.MARKER).write_text("workspace: 1\n")
    for flow in ("retrain", "model_stage"):
        e = entrypoint(tmp_path, flow)
        assert e == f"qlora_ops.flows.{flow}:{flow}" and import_object(e).name.startswith("qlora-")


def test_the_cli_runs_each_command_on_the_workspace_holding_the_current_folder(tmp_path, monkeypatch):
    import qlora_ops.flows.cli as cli

    (tmp_path / "ws" / "notes").mkdir(parents=True)
    (tmp_path / "ws" / workspace_file.MARKER).write_text("workspace: 1\n")
    seen = []
    monkeypatch.setattr(cli, "COMMANDS", {**cli.COMMANDS, "status": lambda a: seen.append(a) or 0})
    monkeypatch.chdir(tmp_path / "ws" / "notes")
    assert cli.main(["status"]) == 0
    assert seen[0].workspace == str(tmp_path / "ws") and seen[0].params == "params/default.yaml"
