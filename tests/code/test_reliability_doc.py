"""docs/reliability.md names, for every fault, the test that holds its behaviour: each name must exist,
so a renamed or deleted test cannot leave a row pointing at nothing."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test")}


def test_every_test_named_in_the_reliability_table_exists():
    doc = (ROOT / "docs" / "reliability.md").read_text()
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", doc)
    assert len(named) > 40  # the table really is read
    missing = [f"{f}::{t}" for f, t in named if not (ROOT / f).is_file() or t not in _tests_in(ROOT / f)]
    assert not missing, missing


def test_every_row_names_a_test_or_says_todo():
    doc = (ROOT / "docs" / "reliability.md").read_text()
    rows = [l for l in doc.splitlines() if l.startswith("| ") and not l.startswith(("| fault", "| code"))]
    bare = [r for r in rows if "::" not in r and "TODO" not in r]
    assert rows and not bare, bare
