"""The house's one direction of imports (pyproject.toml [tool.importlinter], docs/architecture.md): the layers
hold, an upward import fails `lint-imports` with the names, no module import circle, every package installed."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp

from tests.conftest import ROOT

LINT = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path, ns: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": str(LINT.parent)} | ({"PYTHONPATH": str(ns)} if ns else {})
    return subprocess.run([str(LINT), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True, timeout=300)


def test_the_layers_hold():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_an_upward_import_fails_the_contract_naming_both_modules(tmp_path):
    """A copy of the code installed under qlora_ops (the same mapping as the package), with one import added
    from core up to the flows: lint-imports fails and says which module imports which."""
    tree, ns = tmp_path / "tree", tmp_path / "ns"
    for d in ("tasks", "flows"):
        shutil.copytree(ROOT / d, tree / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", tree / "pyproject.toml")
    (ns / "qlora_ops").mkdir(parents=True)
    for d in ("tasks", "flows"):
        (ns / "qlora_ops" / d).symlink_to(tree / d)
    assert _lint(tree, ns).returncode == 0  # the copy itself is clean
    with open(tree / "tasks" / "core" / "paths.py", "a") as f:
        f.write("\nfrom qlora_ops.flows import retrain  # noqa: E402,F401  (upward on purpose)\n")
    r = _lint(tree, ns)
    assert r.returncode != 0
    assert "qlora_ops.tasks.core is not allowed to import qlora_ops.flows" in r.stdout
    assert "qlora_ops.tasks.core.paths -> qlora_ops.flows.retrain" in r.stdout


def test_no_module_import_circle():
    g = grimp.build_graph("qlora_ops.tasks", "qlora_ops.flows", include_external_packages=False)
    circles = []
    for m in sorted(g.modules):
        for d in g.find_modules_directly_imported_by(m):
            if g.chain_exists(importer=d, imported=m):
                circles.append(f"{m} -> {d} -> ... -> {m}")
    assert circles == []


def test_every_package_folder_is_installed_under_the_one_namespace():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    data = {"qlora_ops.params": "params", "qlora_ops.infra": "infra", "qlora_ops.locks": "locks"}  # package data
    assert tool["package-dir"] == {"qlora_ops.tasks": "tasks", "qlora_ops.flows": "flows", **data}
    folders = {"qlora_ops." + p.parent.relative_to(ROOT).as_posix().replace("/", ".")
               for d in ("tasks", "flows") for p in (ROOT / d).rglob("__init__.py")}
    assert set(tool["packages"]) == folders | set(data)
