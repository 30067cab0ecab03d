"""A kill at every registry write of every write sequence, on a real `mlflow server`: the next writer
repairs what it left (issue 25). Sequences: a run's register + promote, `promote --force`, `rollback`, the
`serving` move.

The kill is in-process: from the Nth write on, every MlflowClient write method raises Killed (a
BaseException no handler of ours catches), so the store holds exactly what a process killed at that
write leaves: writes 1..N-1, nothing after (the cleanup writes a handler would attempt die too). The fcntl
lock is released when the call unwinds, as the kernel releases it when a process dies.
tests/code/test_registry_kill_process.py kills a real process (os._exit) at the alias write, the same
state by another route.
"""
from __future__ import annotations

import uuid
from contextlib import contextmanager

import pytest

SERVING = {"system_prompt": "Answer with the label.", "max_new_tokens": 4, "batch_size": 8}
# Every MlflowClient method our sequences write through (mlflow.register_model included).
WRITES = ("create_registered_model", "_create_model_version", "create_model_version", "set_logged_model_tags",
          "set_model_version_tag", "delete_model_version_tag", "update_model_version", "set_registered_model_tag",
          "delete_registered_model_tag", "set_registered_model_alias", "delete_registered_model_alias", "log_text")


class Killed(BaseException):
    """The process died at this write."""


@contextmanager
def killed_at(n: int):
    """Writes 1..n-1 go through; write n and every later one raise Killed. Yields a list of the writes seen."""
    from mlflow.tracking import MlflowClient

    seen: list[str] = []
    orig = {m: getattr(MlflowClient, m) for m in WRITES if hasattr(MlflowClient, m)}

    def wrap(name, fn):
        def write(self, *a, **k):
            seen.append(name)
            if len(seen) >= n:
                raise Killed(f"killed at write {len(seen)} ({name})")
            return fn(self, *a, **k)
        return write

    for m, fn in orig.items():
        setattr(MlflowClient, m, wrap(m, fn))
    try:
        yield seen
    finally:
        for m, fn in orig.items():
            setattr(MlflowClient, m, fn)




@pytest.fixture
def model(tracking, merged_model_dir, tmp_path):
    """(name, logged model URI, experiment id, lock path) of a fresh registered-model name."""
    import mlflow

    from qlora_ops.tasks.registry.register import log_merged_model

    exp_id = mlflow.create_experiment(f"kills-{uuid.uuid4().hex[:8]}")
    with mlflow.start_run(experiment_id=exp_id):
        uri = log_merged_model(merged_model_dir, SERVING)
    return f"kills-{uuid.uuid4().hex[:8]}", uri, exp_id, tmp_path / "registry.lock"


def _register(model, promote: bool, run: str) -> dict:
    from qlora_ops.tasks.registry.register import register_and_promote

    name, uri, _, lock = model
    return register_and_promote(model_uri=uri, model_name=name, alias="champion", challenger_alias="challenger",
                                tags={"mlflow_run_id": run, "fingerprint": f"fp-{run}"},
                                decide=lambda v: (promote, f"planted: {'promote' if promote else 'keep'} vs v{v}"),
                                lock_path=lock)


def _ready_version(model, **tags) -> int:
    """A complete version, written directly (the setup of a sequence under test: two writes, not a run's)."""
    import mlflow

    name, uri, _, _ = model
    return int(mlflow.register_model(uri, name, tags={"status": "ready", "promoted": "false", **tags}).version)


def _next_command(model) -> None:
    """What every writer does first (a run before its skip check: tasks.registry.register.repair)."""
    from qlora_ops.tasks.registry.register import repair

    repair(model[0], model[3])


def _state(name: str):
    from mlflow.tracking import MlflowClient

    from qlora_ops.tasks.registry.journal import pending

    c = MlflowClient()
    aliases = {a: int(v) for a, v in (c.get_registered_model(name).aliases or {}).items()}
    tags = {int(v.version): dict(v.tags) for v in c.search_model_versions(f"name = '{name}'")}
    return aliases, tags, pending(c, name)


def _each_kill(model, setup, sequence, check) -> int:
    """For n = 1, 2, ...: `ctx = setup(n)` (not killed), then `sequence(ctx)` killed at its write n, then
    the next command, then `check(ctx, where)`; until the sequence finishes unkilled. Returns its writes."""
    n = 1
    while True:
        ctx = setup(n)
        with killed_at(n) as seen:
            try:
                sequence(ctx)
                done = True
            except Killed:
                done = False
        _next_command(model)
        check(ctx, f"killed at write {n} ({seen[-1]})" if not done else "unkilled")
        if done:
            return n - 1
        n += 1


def test_register_and_promote_killed_at_every_write(model):
    """issue 25: killed between `status=ready`/`promoted=true` and the alias move, the promotion was lost for
    good (the next run with the same inputs was Skipped)."""
    from qlora_ops.tasks.registry.tracking import find_fingerprint

    name, _, exp_id, _ = model
    _register(model, True, "first")

    def check(run: str, where: str) -> None:
        aliases, tags, plan = _state(name)
        assert plan is None, where
        assert tags[aliases["champion"]]["status"] == "ready", where
        mine = [(v, t) for v, t in tags.items() if t.get("mlflow_run_id") == run]
        for v, t in mine:
            if t["status"] == "ready":  # committed: it was decided "promote", so it holds the alias
                assert t["promoted"] == "true" and aliases["champion"] == v, (where, t, aliases)
            else:  # never committed: not the champion, and the next run with these inputs decides again
                assert t["status"] == "incomplete" and aliases["champion"] != v, (where, t)
                assert find_fingerprint(name, exp_id, t["fingerprint"]) is None, where

    writes = _each_kill(model, lambda n: f"run-{n}", lambda run: _register(model, True, run), check)
    assert writes >= 8, writes  # version, decision tags, plan, status, challenger, replaced_by, alias, plan end
    _register(model, False, "after")  # the next registration tags every uncommitted version abandoned
    _, tags, _ = _state(name)
    assert {t["status"] for t in tags.values()} <= {"ready", "abandoned"}


def test_manual_promote_killed_at_every_write(model):
    from qlora_ops.tasks.registry import manual

    name = model[0]
    _register(model, True, "first")
    by = manual.Actor("tester", False, "test")

    def check(v: int, where: str) -> None:
        aliases, tags, plan = _state(name)
        assert plan is None, where
        t, champ = tags[v], aliases["champion"]
        assert (champ == v) == (t.get("promoted_by") == "tester"), (where, champ, t)
        if champ == v:
            assert t["promoted"] == "true" and tags[int(t["previous_champion"])]["replaced_by"] == str(v), where

    writes = _each_kill(model, lambda n: _ready_version(model, mlflow_run_id=f"cand-{n}"),
                        lambda v: manual.promote(name, v, "champion", None, None, force=True, reason="ticket 1", by=by),
                        check)
    assert writes >= 5, writes


def test_rollback_killed_at_every_write(model):
    """issue 25: a rollback killed between its two writes left `champion` on a version tagged rejected."""
    from qlora_ops.tasks.registry import manual

    name = model[0]
    _register(model, True, "first")
    by = manual.Actor("tester", False, "test")

    def setup(n: int) -> int:  # a champion that replaced an earlier one (what `promote` leaves)
        from mlflow.tracking import MlflowClient

        c = MlflowClient()
        prev = c.get_model_version_by_alias(name, "champion").version
        v = _ready_version(model, promoted="true", previous_champion=prev, mlflow_run_id=f"bad-{n}")
        c.set_registered_model_alias(name, "champion", str(v))
        return v

    def check(v: int, where: str) -> None:
        aliases, tags, plan = _state(name)
        assert plan is None, where
        champ = aliases["champion"]
        assert tags[champ].get("status") != "rejected", (where, champ)
        assert (tags[v].get("status") == "rejected") == (champ != v), (where, tags[v], champ)
        if champ != v:
            assert champ == int(tags[v]["previous_champion"]), where

    writes = _each_kill(model, setup, lambda v: manual.rollback(name, "champion", reason="bad", by=by), check)
    assert writes >= 3, writes


def _check_result(name: str, v: int, run_id: str) -> dict:
    """What tasks.serving.parity.check returns for a passing check (the endpoint is not the point here)."""
    return {"model_name": name, "version": v, "url": "http://127.0.0.1:9", "run_id": run_id, "n": 4, "differ": 0,
            "share": 0.0, "ci_low": 0.0, "ci_high": 0.6, "confidence": 0.95, "threshold": 0.02, "passed": True,
            "other_model": [], "metric": "exact_match", "evaluated_metric": 1.0, "served_metric": 1.0, "seconds": 0.1,
            "examples": [], "causes": [], "endpoint": {}, "checked_at": "2026-12-07T00:00:00+0000"}


def test_serving_moves_only_to_the_champion_of_the_moment(model):
    """issue 25: a webhook delivered late moved `serving` to a version that was replaced or rolled back (the
    handler never re-read `champion`); the move had no lock."""
    from mlflow.tracking import MlflowClient

    from qlora_ops.tasks.registry import manual
    from qlora_ops.tasks.serving import parity

    name, _, exp_id, lock = model
    run_id = MlflowClient().create_run(exp_id).info.run_id
    v1 = _register(model, True, "first")["version"]
    v2 = _register(model, True, "second")["version"]
    late = parity.record(_check_result(name, v1, run_id), champion_alias="champion", lock_path=lock)
    assert not late["alias_moved"] and "does not hold 'champion' now (v2)" in late["not_moved"], late
    assert "serving" not in _state(name)[0]
    assert parity.record(_check_result(name, v2, run_id), champion_alias="champion", lock_path=lock)["alias_moved"]
    named = parity.record(_check_result(name, v1, run_id), champion_alias="champion", named=True, lock_path=lock)
    assert named["alias_moved"] and _state(name)[0]["serving"] == v1  # named explicitly: served on purpose

    manual.rollback(name, "champion", reason="bad", by=manual.Actor("tester", False, "test"))  # v2 rejected
    again = parity.record(_check_result(name, v2, run_id), champion_alias="champion", named=True, lock_path=lock)
    assert not again["alias_moved"] and "rejected" in again["not_moved"] and _state(name)[0]["serving"] == v1

    def check(v: int, where: str) -> None:
        aliases = _state(name)[0]
        assert aliases["serving"] in (v1, aliases["champion"]), (where, aliases)  # unchanged, or the champion

    writes = _each_kill(model, lambda n: _state(name)[0]["champion"],
                        lambda v: parity.record(_check_result(name, v, run_id), champion_alias="champion",
                                                lock_path=lock), check)
    assert writes >= 7, writes  # six check tags, the parity file, the alias


def test_an_endpoint_reporting_other_weights_or_dtype_fails_the_check():
    """issue 25: verify-serving passed (and moved `serving`) when the endpoint reported other weights and another
    dtype: "other weights" was only listed as a cause of differing answers."""
    from qlora_ops.tasks.serving.parity import other_model

    ev = {"weights_digest": "a" * 64, "dtype": "float32", "system_prompt": None, "run_id": "r"}
    same = {"weights_digest": "a" * 64, "dtype": "float32"}
    assert other_model(ev, same) == []
    assert [c.split(":")[0] for c in other_model(ev, {**same, "weights_digest": "b" * 64, "dtype": "bfloat16"})] == \
        ["other weights", "dtype"]
    assert other_model(ev, None) == [] and other_model(ev, {"api": "openai", "model": "m"}) == []  # nothing reported


_DIE_AT_ALIAS = """
import os, sys
import mlflow
from mlflow.tracking import MlflowClient
from qlora_ops.tasks.registry.register import register_and_promote

real = MlflowClient.set_registered_model_alias
def die(self, name, alias, version):
    if alias == "champion":
        os._exit(9)  # no handler, no cleanup: the process is gone at the alias write
    return real(self, name, alias, version)
MlflowClient.set_registered_model_alias = die
mlflow.set_tracking_uri(sys.argv[1])
register_and_promote(model_uri=sys.argv[2], model_name=sys.argv[3], alias="champion", challenger_alias="challenger",
                     tags={"mlflow_run_id": "killed", "fingerprint": "fp-killed"}, decide=lambda v: (True, "planted"),
                     lock_path=sys.argv[4])
"""


def test_a_process_killed_at_the_alias_write_is_finished_by_the_next_run(model, tracking):
    """The issue's reproduction with a real process death (os._exit at the champion alias write): the next
    run's start finishes the promotion, so the same inputs are then rightly Skipped, with the alias moved."""
    import subprocess
    import sys

    from qlora_ops.tasks.registry.tracking import find_fingerprint

    name, uri, exp_id, lock = model
    _register(model, True, "first")
    r = subprocess.run([sys.executable, "-c", _DIE_AT_ALIAS, tracking, uri, name, str(lock)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 9, r.stderr[-2000:]
    aliases, tags, plan = _state(name)
    killed = next(v for v, t in tags.items() if t.get("mlflow_run_id") == "killed")
    assert aliases["champion"] != killed and plan is not None and tags[killed]["status"] == "ready"
    _next_command(model)  # the next run, before its skip check
    aliases, tags, plan = _state(name)
    assert aliases["champion"] == killed and plan is None and tags[killed - 1]["replaced_by"] == str(killed)
    assert find_fingerprint(name, exp_id, "fp-killed").startswith(f"{name} v{killed} ")
