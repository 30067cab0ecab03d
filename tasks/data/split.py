"""Which split each row goes to: by near-duplicate cluster, pinned by the test-set lineage.

A cluster (tasks/data/dedupe.py: equal exact key, equal normalised prompt, or near-duplicate) lives in one
split. The rows the lineage knows (tasks/data/lineage.py) join the clustering as extra members, so:
  - a cluster holding a row that was ever in this lineage's test split stays in test (pinned);
  - else a cluster holding a row ever trained on stays in train, one recorded in val stays in val;
  - else the split comes from the hash bucket of its rows' exact prompt keys (the largest: a cluster that
    grows can only move away from test). A cluster of one row keeps the bucket it always had.
"""
from __future__ import annotations

from qlora_ops.tasks.core.config import DataParams
from qlora_ops.tasks.data.dedupe import clusters
from qlora_ops.tasks.data.text import sha256_text


def bucket(seed: int, key: str) -> float:
    """[0, 1) from a hash of the prompt alone: adding rows never moves old rows between splits."""
    return int(sha256_text(f"{seed}:{key}")[:12], 16) / 16 ** 12


def row_key(text: str) -> str:
    """The lineage's name of a row: the hash of its normalised full prompt."""
    return sha256_text(text)[:16]


def _by_bucket(b: float, d: DataParams) -> str:
    return "test" if b < d.split.test else "val" if b < d.split.test + d.split.val else "train"


def assign(rows: list[tuple[str, str]], d: DataParams, lin: dict) -> tuple[list[str], dict]:
    """rows: (exact prompt key, normalised full prompt) per kept row. Returns the split of each row and
    {"contamination", "moved", "near_duplicate_rows", "pinned_test"}; "moved" counts rows whose split under
    these settings alone (no pins) differs from the split the lineage recorded for them."""
    n = len(rows)
    known = {k: r["text"] for k, r in lin["rows"].items()}
    known.update({k: t for k, t in lin["trained"].items() if k not in known})
    extra = sorted(known.items())
    cid = clusters([t for _, t in rows] + [t for _, t in extra], d.split.near_dup_threshold,
                   [k for k, _ in rows] + [f"\0known:{k}" for k, _ in extra])
    pinned, trained, val = set(), set(), set()
    for j, (k, _) in enumerate(extra):
        c, rec = cid[n + j], lin["rows"].get(k, {}).get("split")
        if rec == "test":
            pinned.add(c)
        if k in lin["trained"] or rec == "train":
            trained.add(c)
        if rec == "val":
            val.add(c)
    top: dict[int, float] = {}
    for i, (key, _) in enumerate(rows):
        top[cid[i]] = max(top.get(cid[i], -1.0), bucket(d.split.seed, key))
    free = [_by_bucket(top[cid[i]], d) for i in range(n)]
    out = ["test" if cid[i] in pinned else "train" if cid[i] in trained else "val" if cid[i] in val else free[i]
           for i in range(n)]
    size = {}
    for c in cid[:n]:
        size[c] = size.get(c, 0) + 1
    moved = sum(1 for i, (_, t) in enumerate(rows)
                if (rec := lin["rows"].get(row_key(t), {}).get("split")) and rec != free[i])
    return out, {"contamination": sum(1 for i in range(n) if out[i] == "test" and cid[i] in trained),
                 "moved": moved, "near_duplicate_rows": sum(1 for c in cid[:n] if size[c] > 1),
                 "pinned_test": sum(1 for i in range(n) if cid[i] in pinned)}
