"""Training in a fresh process (the flow's train stage): the result comes back, the child's peak is its
own, and a child's failure comes back as the same error class (exit codes 3 and 2 stay as they were)."""
import json

import pytest

from qlora_ops.tasks.data.prepare import DataError
from qlora_ops.tasks.model.modeling import DivergenceError
from qlora_ops.tasks.train.process import JEMALLOC_CONF, child_env, jemalloc, train_subprocess
from tests.conftest import tiny_params


@pytest.fixture(autouse=True)
def _in_a_child(monkeypatch):
    """This file tests the child itself: not the suite's in-process switch (tasks.core.child)."""
    monkeypatch.setenv("QLORA_STAGES_IN_PROCESS", "0")


def test_the_suites_switch_trains_in_this_process_with_the_same_result(tiny_model_dir, toy_data, tmp_path,
                                                                       monkeypatch):
    import torch

    from qlora_ops.tasks.train import process

    monkeypatch.setenv("QLORA_STAGES_IN_PROCESS", "1")
    real_popen = process.popen_child
    monkeypatch.setattr(process, "popen_child", lambda *a, **k: pytest.fail("a child was started"))
    threads = torch.get_num_threads()
    lines = []
    p = tiny_params(tiny_model_dir, max_steps=2, eval_every=2, threads=1)
    here = train_subprocess(p, tiny_model_dir, toy_data, tmp_path / "here", "qlora", on_log=lines.append)
    assert here["process_peak_bytes"] > 0 and here["steps"] == 2
    assert any(ln.startswith("[qlora] step 2/2") for ln in lines), lines
    assert here == json.loads((tmp_path / "here" / "result.json").read_text())
    assert torch.get_num_threads() == threads  # the caller's thread count is given back
    monkeypatch.setenv("QLORA_STAGES_IN_PROCESS", "0")
    monkeypatch.setattr(process, "popen_child", real_popen)
    child = train_subprocess(p, tiny_model_dir, toy_data, tmp_path / "child", "qlora", on_log=lambda s: None)
    assert here["final_train_loss"] == pytest.approx(child["final_train_loss"], rel=1e-5)
    assert here["final_val_loss"] == pytest.approx(child["final_val_loss"], rel=1e-5)


def test_subprocess_training_returns_its_result_and_own_peak(tiny_model_dir, toy_data, tmp_path):
    lines = []
    res = train_subprocess(tiny_params(tiny_model_dir, max_steps=2, eval_every=2), tiny_model_dir, toy_data,
                           tmp_path / "run", "qlora", on_log=lines.append)
    assert res["steps"] == 2 and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert any(ln.startswith("[qlora] step 2/2") for ln in lines), lines  # the child's log reaches the parent
    assert not any(ln.startswith("{") for ln in lines)
    # the child's own high-water mark: more than an idle interpreter, far less than this test process
    # holding torch + transformers would report for itself
    assert 100 * 2**20 < res["process_peak_bytes"] < 4 * 2**30
    assert res == json.loads((tmp_path / "run" / "result.json").read_text())
    # the allocator the child was given (.ci/setup.sh installs libjemalloc2; without it, glibc at 1 MiB)
    want = f"jemalloc, MALLOC_CONF={JEMALLOC_CONF}" if jemalloc() else "glibc, MALLOC_MMAP_THRESHOLD_=1048576"
    assert res["allocator"] == want, res["allocator"]


def test_child_allocator_is_jemalloc_unless_the_caller_chose(tmp_path):
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    env = child_env({"QLORA_OPS_JEMALLOC": str(lib), "PATH": "/bin"})
    assert env["LD_PRELOAD"] == str(lib) and "MALLOC_MMAP_THRESHOLD_" not in env
    assert "dirty_decay_ms:-1" in env["MALLOC_CONF"] and "oversize_threshold:0" in env["MALLOC_CONF"]
    assert child_env({"QLORA_OPS_JEMALLOC": str(lib), "MALLOC_CONF": "narenas:1"})["MALLOC_CONF"] == "narenas:1"
    # never purging only with checkpointing: without it that retained 7-10 GB (bench/RESULTS.md)
    assert "dirty_decay_ms:30000" in child_env({"QLORA_OPS_JEMALLOC": str(lib)}, checkpointing=False)["MALLOC_CONF"]
    off = child_env({"QLORA_OPS_JEMALLOC": "off"})
    assert "LD_PRELOAD" not in off and off["MALLOC_MMAP_THRESHOLD_"] == "1048576"
    for chosen in ({"LD_PRELOAD": "/x.so"}, {"MALLOC_MMAP_THRESHOLD_": "65536"}):
        assert child_env({**chosen, "QLORA_OPS_JEMALLOC": str(lib)}) == {**chosen, "QLORA_OPS_JEMALLOC": str(lib)}


def test_child_divergence_and_bad_data_keep_their_error_class(tiny_model_dir, toy_data, tmp_path):
    with pytest.raises(DivergenceError, match="diverged"):
        train_subprocess(tiny_params(tiny_model_dir, max_steps=30, lr=1e30, max_grad_norm=1e12, warmup_steps=0), tiny_model_dir, toy_data,
                         tmp_path / "div", "lora", on_log=lambda s: None)
    long = json.dumps({"id": "x", "system": "s", "prompt": "p", "completion": "word " * 200})  # > max_seq_len
    (toy_data / "train.jsonl").write_text(long + "\n")
    with pytest.raises((DataError, DivergenceError)) as e:
        train_subprocess(tiny_params(tiny_model_dir, max_steps=1), tiny_model_dir, toy_data, tmp_path / "bad", "lora",
                         on_log=lambda s: None)
    assert e.type is DataError and "max_seq_len" in str(e.value), e.value
