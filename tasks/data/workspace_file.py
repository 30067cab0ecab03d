"""The workspace file, qlora-ops.yaml: the marker of a workspace of your own and what its DVC stages depend on.

In the qlora-ops clone, dvc.yaml's sample and prepare stages depend on the code they run (tasks/data/prepare.py,
tasks/core/config.py). A workspace made by `qlora-ops workspace init` has no such files (the code is in the
installed package), so its stages depend on qlora-ops.yaml instead, which holds the hash of that same code:
a qlora-ops whose data code differs rewrites it, and DVC re-runs the stages, as an edit of prepare.py does in
the clone. A release that changes no data code leaves the file, and the stages, as they are.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

from qlora_ops.tasks.core.util import atomic_write_text
from qlora_ops.tasks.model.keys import ROOT, source_files

MARKER = "qlora-ops.yaml"
# What the clone's stages depend on (dvc.yaml); a workspace's depend on MARKER instead.
CLONE_DEPS = ("tasks/data/prepare.py", "tasks/core/config.py")
FORMAT = 1
HEADER = """\
# A qlora-ops workspace (`qlora-ops workspace init`): every qlora-ops command run in this folder or below it
# works here. data_code: the hash of the qlora-ops code dvc.yaml's sample and prepare stages run (tasks/data/,
# tasks/core/config.py's defaults); the stages depend on this file, so a qlora-ops whose data code differs
# re-runs them. Written by qlora-ops; commit it with dvc.yaml.
"""


def is_source_tree(workspace: Path) -> bool:
    """The qlora-ops clone (or a copy of its code): the stages depend on the code files themselves."""
    return all((Path(workspace) / d).is_file() for d in CLONE_DEPS)


def stage_deps(workspace: Path) -> tuple[str, ...]:
    return CLONE_DEPS if is_source_tree(workspace) else (MARKER,)


def data_code(root: Path = ROOT) -> str:
    """sha256 (16 hex) of the code the sample and prepare stages run, by content (as keys.code_hash)."""
    files = source_files("data", root=root) + [root / "tasks/core/config.py"]
    h = hashlib.sha256()
    for d in sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in files):
        h.update(d.encode())
    return h.hexdigest()[:16]


def read_marker(workspace: Path) -> dict:
    f = Path(workspace) / MARKER
    return (yaml.safe_load(f.read_text()) or {}) if f.is_file() else {}


def write_marker(workspace: Path) -> bool:
    """Make MARKER name this qlora-ops's data code; untouched (no DVC re-run) when it already does."""
    want = {"workspace": FORMAT, "data_code": data_code()}
    if read_marker(workspace) == want:
        return False
    atomic_write_text(Path(workspace) / MARKER, HEADER + yaml.safe_dump(want, sort_keys=False))
    return True
