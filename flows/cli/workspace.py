"""`qlora-ops workspace init DIR`, and how every command finds its workspace: like git and dvc, the nearest
folder from the current directory up that is one (tasks.intake.workspace.find_root), unless --workspace
names another."""
from __future__ import annotations

import os
from pathlib import Path

from qlora_ops.tasks.intake import workspace


def add_workspace_parser(sub) -> None:
    w = sub.add_parser("workspace", help="a workspace of your own: `workspace init DIR` makes one (git + DVC, "
                                         "params/, dvc.yaml) or adopts an existing git repository")
    ws = w.add_subparsers(dest="ws_cmd", required=True)
    i = ws.add_parser("init", help="make DIR a workspace (created if missing); adds only what is missing")
    i.add_argument("dir", nargs="?", default=".", help="(default: the current directory)")


def workspace_command(a) -> int:
    d = Path(a.dir).resolve()
    for line in workspace.init(d) or ["nothing to add: already a workspace"]:
        print(line)
    print(f"workspace {d}\nnext: cd {d} && qlora-ops init YOUR_DATA.jsonl   (or `qlora-ops run`: the built-in sample)")
    return 0


def resolve(a) -> None:
    """--workspace left at its default "." means the workspace holding the current directory; a relative
    --params that exists from here is made relative to that root (params paths are workspace-relative)."""
    if getattr(a, "workspace", None) != ".":
        return
    here = Path.cwd()
    root = workspace.find_root(here)
    if root is None or root == here.resolve():
        return
    a.workspace = str(root)
    p = getattr(a, "params", None)
    if p and not Path(p).is_absolute() and (here / p).is_file():
        a.params = os.path.relpath((here / p).resolve(), root)
