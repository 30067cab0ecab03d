"""The test-set lineage: which rows were ever tested on and trained on, so the split never leaks.

    .qlora-ops/lineage/data-prepared-default.json   # the live file, in the state dir (a kept volume on a
                                                    # team worker: a rebuilt container still has it)
    data/prepared/default.lineage.json              # the copy each prepare writes beside data.prepared: a plain
                                                    # DVC output (versioned, pushed, restored by the run cache)

Why two: a `persist` DVC output would keep the file across reruns, but DVC's run cache skips every stage
with one, so a rebuilt worker would redo prepare; and the file beside data.prepared lives in the checkout,
which a rebuilt container loses with the rows ever trained on. The state-dir file is the truth and only
grows; the copy seeds it when the state dir is new (tasks/data/versioning.py).

{"lineage": n, "settings": {split.seed, split.test, split.val, max_input_chars, normaliser,
 near_dup_threshold}, "rows": {row key: {"split", "text"}}, "trained": {row key: text}, "previous": [...]}

- A row key is the hash of the row's normalised full prompt (tasks/data/dedupe.py, before the
  max_input_chars cut, so changing the cut does not rename rows); "text" is that normalised prompt, so a
  near-duplicate edited later still finds its cluster.
- "rows": the split each row got in this lineage. A row once in test stays recorded as test for ever
  (pinned), even after it leaves the data; prepare keeps its cluster in test.
- "trained": every row that was ever in a prepared train split, across lineages: a superset of what
  any registered model (the champion included) trained on. Its clusters stay in train, and a test row
  whose cluster holds one is contamination (stats.json `contamination`; it must be 0 to promote).
- Settings that move rows between splits are recorded; prepare refuses another value that would move
  rows (naming the key and the count) until `qlora-ops data new-lineage` starts a new lineage: the test
  pins and recorded splits are cleared (the previous lineage is kept under "previous"), "trained" stays.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from qlora_ops.tasks.core.config import DataParams, Params
from qlora_ops.tasks.core.paths import state_dir, ws_path
from qlora_ops.tasks.core.util import atomic_write_json
from qlora_ops.tasks.data.dedupe import NORMALISER
from qlora_ops.tasks.data.readers import DataError

NEW_LINEAGE = "qlora-ops data new-lineage --params <file>"


def lineage_path(workspace: Path, params: Params) -> Path:
    """The live lineage of data.prepared, in the state dir: the same file for `check`, `run` and `data
    new-lineage`."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(params.data.prepared).as_posix()).strip("-.") or "prepared"
    return state_dir(workspace, params) / "lineage" / f"{slug}.json"


def copy_path(workspace: Path, d: DataParams) -> Path:
    """<data.prepared>.lineage.json: the versioned copy beside the prepared directory (never inside: it is
    not part of the data version). Before this release, the live file."""
    p = ws_path(workspace, d.prepared)
    return p.with_name(p.name + ".lineage.json")


def adopt(workspace: Path, params: Params) -> Path | None:
    """A state dir without the lineage (new volume, first run after an upgrade) takes the copy beside
    data.prepared, so rows once tested or trained on keep their place. Returns the copy taken, if any."""
    live, copy = lineage_path(workspace, params), copy_path(workspace, params.data)
    if live.is_file() or not copy.is_file():
        return None
    live.parent.mkdir(parents=True, exist_ok=True)
    save(live, load(copy))
    return copy


def settings(d: DataParams) -> dict:
    """The settings that decide which split a row lands in."""
    return {"split.seed": d.split.seed, "split.test": d.split.test, "split.val": d.split.val,
            "max_input_chars": d.max_input_chars, "normaliser": NORMALISER,
            "split.near_dup_threshold": d.split.near_dup_threshold}


def empty() -> dict:
    return {"lineage": 1, "settings": None, "rows": {}, "trained": {}, "previous": []}


def load(path: Path) -> dict:
    if not path.is_file():
        return empty()
    try:
        lin = json.loads(path.read_text())
        assert isinstance(lin.get("rows"), dict) and isinstance(lin.get("trained"), dict)
        return lin
    except (ValueError, AssertionError, AttributeError):
        raise DataError(f"{path}: not a test-set lineage file (unreadable JSON); restore it from DVC "
                        f"(`dvc checkout {path.name}`), or start a new lineage: {NEW_LINEAGE}") from None


def changed(lin: dict, d: DataParams) -> list[str]:
    """Split settings that differ from the lineage's recorded ones ([] for a fresh lineage)."""
    old, new = lin.get("settings"), settings(d)
    return [] if old is None else [k for k in new if old.get(k) != new[k]]


def refuse_moves(lin: dict, d: DataParams, moved: int, path: Path) -> None:
    """A split setting changed and would move `moved` rows: refuse, naming the settings and the fix."""
    keys = changed(lin, d)
    if not keys or not moved:
        return
    old = lin["settings"]
    what = ", ".join(f"{k} {old.get(k)!r} -> {settings(d)[k]!r}" for k in keys)
    raise DataError(f"{what}: this would move {moved} row(s) between train, val and test of test-set lineage "
                    f"{lin['lineage']} ({path}), so the champion would be compared on rows it trained on. Put the "
                    f"setting back, or start a new test-set lineage (comparisons with the champion restart on new "
                    f"test rows; rows ever trained on stay out of test): {NEW_LINEAGE}")


def record(lin: dict, d: DataParams, assigned: dict[str, tuple[str, str]]) -> dict:
    """The lineage after a prepare: `assigned` {row key: (split, text)}. Test pins are never undone."""
    rows = dict(lin["rows"])
    trained = dict(lin["trained"])
    for key, (split, text) in assigned.items():
        if rows.get(key, {}).get("split") != "test":
            rows[key] = {"split": split, "text": text}
        if split == "train":
            trained[key] = text
    return {**lin, "settings": settings(d), "rows": dict(sorted(rows.items())),
            "trained": dict(sorted(trained.items()))}


def save(path: Path, lin: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, lin)


def new_lineage(path: Path, reason: str = "") -> dict:
    """Start the next lineage: clear pins and recorded splits, keep "trained"; the old one is summarised
    under "previous". The next prepare adopts the params' settings."""
    lin = load(path)
    tests = sum(1 for r in lin["rows"].values() if r["split"] == "test")
    prev = {"lineage": lin["lineage"], "settings": lin["settings"], "test_rows": tests,
            "ended": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "reason": reason}
    new = {"lineage": lin["lineage"] + 1, "settings": None, "rows": {}, "trained": lin["trained"],
           "previous": [*lin.get("previous", []), prev]}
    path.parent.mkdir(parents=True, exist_ok=True)
    save(path, new)
    return new
