"""Resuming a training launched with another process count (issue 25): DDP's replicated optimizer state
resumes, FSDP's per-rank shards are refused with why, and pruning never deletes what this run just wrote.
In-process, world 1, on the tiny model; the checkpoint's recorded layout is edited to stand for the other
launch (what find_checkpoint reads)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qlora_ops.tasks.core.util import write_manifest
from qlora_ops.tasks.train.checkpoints import ResumeRefused, checkpoints, prunable
from qlora_ops.tasks.train.loop import train
from tests.conftest import tiny_params


def _as_if_written_by(ckpt: Path, world: int, fsdp: bool) -> None:
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    (ckpt / "checkpoint.json").write_text(json.dumps({**meta, "world_size": world, "fsdp": fsdp}))
    if world > 1:  # each rank's trainer state: under DDP the same optimizer state, replicated
        shutil.copy(ckpt / "trainer_state.pt", ckpt / "trainer_state.rank1.pt")
    write_manifest(ckpt)


@pytest.fixture
def interrupted(tiny_model_dir, toy_data, tmp_path):
    """A run that saved step 4 of 8, then lost its final adapter (as if killed after the checkpoint)."""
    p = tiny_params(tiny_model_dir, max_steps=8, save_every=4, keep_last=1)
    run = tmp_path / "run"
    train(p, tiny_model_dir, toy_data, run, "lora")
    assert checkpoints(run / "checkpoints") == [4]
    for f in ("result.json", "history.jsonl"):
        (run / f).unlink(missing_ok=True)
    shutil.rmtree(run / "adapter")
    return p, run


def test_ddp_checkpoint_resumes_with_another_process_count(interrupted, tiny_model_dir, toy_data):
    p, run = interrupted
    _as_if_written_by(run / "checkpoints" / "step-000004", world=2, fsdp=False)
    said = []
    res = train(p, tiny_model_dir, toy_data, run, "lora", on_log=said.append)
    assert res["resumed_from"] == 4, said  # today: "written by 2 processes" -> unusable -> step 0
    assert any("resuming from checkpoint step 4" in s and "written by 2 process(es)" in s for s in said), said


def test_fsdp_checkpoint_with_another_process_count_is_refused_with_why(interrupted, tiny_model_dir, toy_data):
    p, run = interrupted
    _as_if_written_by(run / "checkpoints" / "step-000004", world=2, fsdp=True)
    with pytest.raises(ResumeRefused, match=r"FSDP over 2 processes.*sharded per rank.*Relaunch with 2 process"):
        train(p, tiny_model_dir, toy_data, run, "lora")
    assert checkpoints(run / "checkpoints") == [4]  # nothing overwritten or pruned


def test_checkpoints_it_just_wrote_are_never_pruned(tiny_model_dir, toy_data, tmp_path):
    """Stale checkpoints of a line this run did not resume from (here: one it cannot load) lie past its
    steps; keep_last kept them by number and pruned the run's own new checkpoint."""
    run = tmp_path / "run"
    stale = run / "checkpoints" / "step-000040"
    stale.mkdir(parents=True)
    (stale / "checkpoint.json").write_text(json.dumps({"step": 40, "world_size": 1}))  # no manifest: unusable
    train(tiny_params(tiny_model_dir, max_steps=8, save_every=4, keep_last=1), tiny_model_dir, toy_data, run, "lora")
    assert checkpoints(run / "checkpoints") == [4]


def test_prunable():
    assert prunable([4, 20, 40], 4, 2) == [20, 40]
    assert prunable([4, 8, 12], 12, 2) == [4]
    assert prunable([12], 12, 1) == []
