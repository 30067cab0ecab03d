"""Without jemalloc the training says once what that costs and how to get it (tasks/train/process.py),
and trains anyway (on glibc with the fixed mmap threshold)."""
from __future__ import annotations

from qlora_ops.tasks.train import process as train_process


def test_missing_jemalloc_is_noted_once_with_cost_and_remedy(monkeypatch, tmp_path):
    monkeypatch.setattr(train_process, "JEMALLOC_PATHS", (str(tmp_path / "libjemalloc.so.2"),))
    monkeypatch.setattr(train_process, "_noted", False)
    env = {"PATH": "/bin"}
    note = train_process.allocator_note(env)
    assert note and "0.5 GB more" in note and "apt-get install libjemalloc2" in note and "QLORA_OPS_JEMALLOC" in note
    assert train_process.allocator_note(env) is None  # once per process
    assert train_process.child_env(env) == {**env, **train_process.GLIBC_FALLBACK}  # and it goes on, on glibc


def test_no_note_when_jemalloc_is_there_or_the_caller_chose(monkeypatch, tmp_path):
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    monkeypatch.setattr(train_process, "JEMALLOC_PATHS", (str(lib),))
    monkeypatch.setattr(train_process, "_noted", False)
    assert train_process.allocator_note({}) is None
    monkeypatch.setattr(train_process, "JEMALLOC_PATHS", ())
    for chosen in ({"QLORA_OPS_JEMALLOC": "off"}, {"LD_PRELOAD": "x"}, {"MALLOC_MMAP_THRESHOLD_": "65536"}):
        assert train_process.allocator_note(chosen) is None
    assert train_process.allocator_note({}) is not None
