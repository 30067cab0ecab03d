"""Registry write sequences that a kill at any point leaves repairable: a plan written first, replayed by
the next writer.

MLflow has no transaction over several writes. Every sequence that commits a decision (a run's promotion,
`promote`, `rollback`, the `serving` move) therefore writes, as ONE write before any other of its commit
writes, the plan of those writes as a tag on the registered model (`qlora_ops.pending`), then applies
them, then deletes the tag. Every writer (the same lock held: tasks.registry.register.registry_lock and
flows.registry_slot) first calls `reconcile`, which replays a plan left by a killed writer, so a kill
leaves one of exactly three states:

- before the plan: nothing of the commit is written (a new version is still `incomplete`: the next
  writer tags it `abandoned`, and the skip check does not count it, so the next run decides again);
- after the plan, before its delete: the next writer (or `qlora-ops status`/`promote`/`rollback`/
  `verify-serving`, or the next run's start) replays every write of it (each is idempotent) and deletes it;
- after the delete: done.

A plan names the alias holders it expects (`expect`): if another writer moved an alias since (one that
bypassed the lock), the plan is not replayed over it; the version gets `promotion_error` and the plan is
dropped, said in the returned message. A serving plan moves `serving` only while its version still holds
the champion alias (or was named explicitly).
"""
from __future__ import annotations

import json
import os
import socket
import time

from mlflow.tracking import MlflowClient

PENDING = "qlora_ops.pending"  # registered-model tag: the plan of a sequence begun and not finished


def plan(op: str, *, writes: list[list[str]], expect: dict[str, str | None] | None = None,
         serving_of: dict | None = None) -> dict:
    """A plan: `writes` in order, each ["tag", version, key, value] or ["alias", alias, version];
    `expect`: {alias: version or None} the sequence was decided against; `serving_of`: for a serving move,
    {"version", "champion_alias", "named"}. A tag value is cut to 1000 characters: the plan is one tag,
    and SQL stores hold at most 5000 in one."""
    writes = [w[:3] + [str(w[3])[:1000]] if w[0] == "tag" else w for w in writes]
    return {"op": op, "writes": writes, "expect": expect or {}, "serving_of": serving_of,
            "by": f"{socket.gethostname()}:{os.getpid()}", "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _aliases(c: MlflowClient, name: str) -> dict[str, str]:
    return {a: str(v) for a, v in (c.get_registered_model(name).aliases or {}).items()}


def pending(c: MlflowClient, name: str) -> dict | None:
    """The plan a writer began and did not finish, or None (also for a model that does not exist yet)."""
    from mlflow.exceptions import MlflowException

    try:
        raw = (c.get_registered_model(name).tags or {}).get(PENDING)
    except MlflowException:
        return None
    return json.loads(raw) if raw else None


def _apply(c: MlflowClient, name: str, p: dict) -> None:
    for w in p["writes"]:
        if w[0] == "tag":
            c.set_model_version_tag(name, w[1], w[2], w[3])
        elif w[0] == "alias":
            c.set_registered_model_alias(name, w[1], w[2])
        else:
            raise ValueError(f"unknown write {w[0]!r} in the pending plan of {name}")


def run(c: MlflowClient, name: str, p: dict) -> None:
    """Begin (the plan: one write), apply every write, end (delete the plan). The caller holds the lock
    and has reconciled (a plan already pending would be overwritten)."""
    c.set_registered_model_tag(name, PENDING, json.dumps(p, sort_keys=True))
    _apply(c, name, p)
    c.delete_registered_model_tag(name, PENDING)


def _blocked(c: MlflowClient, name: str, p: dict) -> str | None:
    """Why the plan must not be replayed now, or None."""
    now = _aliases(c, name)
    targets = {w[1]: w[2] for w in p["writes"] if w[0] == "alias"}
    for alias, was in (p.get("expect") or {}).items():
        if now.get(alias) not in (was, targets.get(alias)):
            return (f"'{alias}' moved to v{now.get(alias)} since the plan was written (it expected "
                    f"{'v' + was if was else 'none'})")
    s = p.get("serving_of")
    if s and not s.get("named") and now.get(s["champion_alias"]) != str(s["version"]):
        return (f"v{s['version']} no longer holds '{s['champion_alias']}' (now "
                f"{'v' + now[s['champion_alias']] if s['champion_alias'] in now else 'none'})")
    return None


def reconcile(c: MlflowClient, name: str) -> str | None:
    """Finish or drop the plan a killed writer left; the caller holds the registry lock. Returns what was
    done (for the log), or None when nothing was pending."""
    p = pending(c, name)
    if p is None:
        return None
    what = f"{p['op']} begun by {p.get('by', '?')} at {p.get('at', '?')}"
    if (why := _blocked(c, name, p)) is not None:
        version = next((w[1] for w in p["writes"] if w[0] == "tag"), None)
        if version is not None:
            c.set_model_version_tag(name, version, "promotion_error", f"unfinished {what} dropped: {why}"[:5000])
        c.delete_registered_model_tag(name, PENDING)
        return f"dropped the unfinished {what}: {why}"
    _apply(c, name, p)
    c.delete_registered_model_tag(name, PENDING)
    return f"finished the {what} (its writer was killed after planning it)"
