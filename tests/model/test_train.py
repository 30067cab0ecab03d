"""Training on a tiny random Llama: masking, checkpoints, resume after kill -9, seeds, divergence, EOS."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qlora_ops.tasks.model.modeling import DivergenceError
from qlora_ops.tasks.model.prompting import encode
from qlora_ops.tasks.train.batches import batch_order, collate
from qlora_ops.tasks.train.checkpoints import checkpoints
from qlora_ops.tasks.train.loop import train
from tests.conftest import ROOT, tiny_params


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def test_prompt_is_masked_and_target_ends_with_eos(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, labels = encode(tok, {"system": "s", "prompt": "p q r", "completion": "json"}, 96)
    n_prompt = sum(1 for x in labels if x == -100)
    assert n_prompt > 0 and labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
    assert tok.decode(ids[n_prompt:-1]) == "json"


def test_collate_left_pads_and_keeps_completion_window():
    b = collate([([1, 2, 3, 4], [-100, -100, 3, 4]), ([5, 6], [-100, 6])], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4], [0, 0, 5, 6]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert b["keep"] == 3  # logits for positions 1..3 predict completion tokens 2..3


def test_batch_order_is_a_function_of_position():
    a = [batch_order(10, m, 4, seed=1) for m in range(5)]
    assert a == [batch_order(10, m, 4, seed=1) for m in range(5)]
    assert sorted(sum(a[:2], []) + a[2][:2]) == list(range(10))  # one epoch = a permutation
    assert a != [batch_order(10, m, 4, seed=2) for m in range(5)]


def test_length_bucketing_is_a_seeded_shuffle_with_less_padding():
    import random
    rng = random.Random(0)
    lengths = [rng.randint(10, 120) for _ in range(300)]
    n, bs = len(lengths), 8
    a = [batch_order(n, m, bs, seed=1, lengths=lengths) for m in range(n // bs + 3)]
    assert a == [batch_order(n, m, bs, seed=1, lengths=lengths) for m in range(n // bs + 3)]  # resume sees the same
    assert sorted(sum(a, [])[:n]) == list(range(n))  # one epoch = a permutation
    assert a != [batch_order(n, m, bs, seed=2, lengths=lengths) for m in range(n // bs + 3)]

    def padding(batches):  # pad tokens computed
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    plain = [batch_order(n, m, bs, seed=1) for m in range(3 * n // bs)]
    bucketed = [batch_order(n, m, bs, seed=1, lengths=lengths) for m in range(3 * n // bs)]
    for epoch in range(3):  # batches stay aligned in later epochs too (300 rows is not a multiple of 8)
        part = slice(epoch * n // bs + 1, (epoch + 1) * n // bs - 1)
        assert padding(bucketed[part]) < 0.2 * padding(plain[part]), epoch
    assert a[:4] != sorted(a[:4], key=lambda b: -max(lengths[i] for i in b))  # batches are not served longest-first


def test_loss_goes_down_and_checkpoints_rotate(tiny_model_dir, toy_data, tmp_path):
    p = tiny_params(tiny_model_dir, max_steps=12, save_every=3, keep_last=2)
    res = train(p, tiny_model_dir, toy_data, tmp_path / "run", "qlora")
    hist = [json.loads(l) for l in Path(res["history"]).read_text().splitlines()]
    assert [h["step"] for h in hist] == list(range(1, 13))
    assert hist[-1]["val_loss"] < hist[3]["val_loss"]
    assert checkpoints(tmp_path / "run" / "checkpoints") == [6, 9]  # keep_last=2; the final step is the adapter
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp*"))
    for k in ("peak_mem_bytes", "tokens_per_s", "lr", "train_loss"):
        assert hist[-1][k] > 0
    assert 0 < res["trainable_share"] < 0.5 and res["weight_bytes"] > 0
    # a finished run is reused, not retrained
    t = time.time()
    assert train(p, tiny_model_dir, toy_data, tmp_path / "run", "qlora") == res and time.time() - t < 1


def test_same_seed_same_adapter_different_seed_differs(tiny_model_dir, toy_data, tmp_path):
    p = tiny_params(tiny_model_dir, max_steps=4)
    train(p, tiny_model_dir, toy_data, tmp_path / "a", "qlora")
    train(p, tiny_model_dir, toy_data, tmp_path / "b", "qlora")
    train(p.model_copy(update={"seed": 7}), tiny_model_dir, toy_data, tmp_path / "c", "qlora")
    a, b, c = adapter(tmp_path / "a"), adapter(tmp_path / "b"), adapter(tmp_path / "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.allclose(a[k], c[k]) for k in a)


def test_absurd_lr_stops_with_divergence_error(tiny_model_dir, toy_data, tmp_path):
    p = tiny_params(tiny_model_dir, max_steps=30, lr=1e30, max_grad_norm=1e12, warmup_steps=0)
    with pytest.raises(DivergenceError, match="diverged"):
        train(p, tiny_model_dir, toy_data, tmp_path / "run", "qlora")
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "result.json").exists()


def _cli(params_file: Path, model: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "qlora_ops.tasks.train", "--params", str(params_file), "--kind", "qlora",
            "--base-dir", str(model), "--data-dir", str(data), "--out", str(out)]


def test_kill_9_then_resume_matches_uninterrupted(tiny_model_dir, toy_data, tmp_path):
    p = tiny_params(tiny_model_dir, max_steps=40, save_every=5, eval_every=10, keep_last=3)
    pf = tmp_path / "p.yaml"
    pf.write_text(yaml.safe_dump(p.model_dump(mode="json")))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli(pf, tiny_model_dir, toy_data, run), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not [s for s in checkpoints(run / "checkpoints") if s >= 10] and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup handlers run: a real crash
    proc.wait()
    assert not (run / "result.json").exists(), "run finished before it could be killed"
    last = max(checkpoints(run / "checkpoints"))
    assert 10 <= last < 40

    r = subprocess.run(_cli(pf, tiny_model_dir, toy_data, run), cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resuming from checkpoint step {last}" in r.stdout
    resumed = json.loads(r.stdout.strip().splitlines()[-1])
    assert resumed["resumed_from"] == last

    ref = train(p, tiny_model_dir, toy_data, tmp_path / "ref", "qlora")
    assert abs(resumed["final_val_loss"] - ref["final_val_loss"]) < 1e-4
    a, b = adapter(run), adapter(tmp_path / "ref")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    hist = [json.loads(l)["step"] for l in (run / "history.jsonl").read_text().splitlines()]
    assert hist == list(range(1, 41))  # no duplicated or missing steps across the crash


def test_incomplete_checkpoint_dir_is_ignored(tiny_model_dir, toy_data, tmp_path):
    p = tiny_params(tiny_model_dir, max_steps=6, save_every=3)
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000005").mkdir(parents=True)  # highest number, but no checkpoint.json
    (run / "checkpoints" / ".tmp-step-000004").mkdir(parents=True)
    res = train(p, tiny_model_dir, toy_data, run, "qlora")
    assert res["resumed_from"] is None


def test_packing_has_no_cross_sample_leakage(tiny_model_dir):
    """Packed loss == unpacked loss: with a leak, later examples would see earlier ones and differ."""
    from transformers import AutoTokenizer

    from qlora_ops.tasks.model.modeling import load_model
    from qlora_ops.tasks.train.batches import batch_loss, collate_packed

    p = tiny_params(tiny_model_dir)
    model, _ = load_model(tiny_model_dir, p, quantized=False)
    model.eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [encode(tok, {"system": "s", "prompt": f"prompt number {i} " * (i + 1), "completion": lab}, 96)
            for i, lab in enumerate(["json", "os", "re", "math", "sys"])]
    packed = collate_packed(rows, tok.pad_token_id, max_len=96)
    assert packed["input_ids"].shape[0] < len(rows)  # several examples share a row
    with torch.no_grad():
        a, na = batch_loss(model, collate(rows, tok.pad_token_id), torch.device("cpu"))
        b, nb = batch_loss(model, packed, torch.device("cpu"))
        # and a leak would be detectable: the same packed row with one causal mask over everything differs
        leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]))
        c, _ = batch_loss(model, leaky, torch.device("cpu"))
    assert na == nb
    assert abs(float(a) - float(b)) < 1e-4, (float(a), float(b))
    assert abs(float(a) - float(c)) > 1e-3


def test_epochs_override_max_steps(tiny_model_dir, toy_data, tmp_path):
    p = tiny_params(tiny_model_dir, max_steps=100, epochs=0.5, batch_size=8)  # 64 rows -> 4 steps
    res = train(p, tiny_model_dir, toy_data, tmp_path / "run", "lora")
    assert res["steps"] == 4


def test_gradient_checkpointing_and_accumulation_keep_the_math(tiny_model_dir, toy_data, tmp_path):
    """Checkpointing recomputes activations (same gradients); 2 x 4 accumulated ~ one batch of 8."""
    # bucketing off: it cuts batches of 4 differently from batches of 8, and this compares the same rows
    base = tiny_params(tiny_model_dir, max_steps=3, batch_size=8, eval_every=3, gradient_checkpointing=False,
                       length_bucketing=False)
    base = base.model_copy(update={"lora": base.lora.model_copy(update={"dropout": 0.0})})  # no RNG in the way
    ref = train(base, tiny_model_dir, toy_data, tmp_path / "ref", "qlora")
    ckpt = train(base.model_copy(update={"training": base.training.model_copy(update={"gradient_checkpointing": True})}),
                 tiny_model_dir, toy_data, tmp_path / "gc", "qlora")
    acc = train(base.model_copy(update={"training": base.training.model_copy(update={"batch_size": 4, "grad_accum": 2})}),
                tiny_model_dir, toy_data, tmp_path / "acc", "qlora")
    assert abs(ckpt["final_val_loss"] - ref["final_val_loss"]) < 1e-5
    assert abs(acc["final_val_loss"] - ref["final_val_loss"]) < 5e-3


def test_truncated_newest_checkpoint_is_skipped_by_hash(tiny_model_dir, toy_data, tmp_path):
    """HF's "last checkpoint" trap: the highest-numbered dir has a checkpoint.json but a truncated
    adapter; resume comes from the one before, with one line naming the damaged file."""
    p = tiny_params(tiny_model_dir, max_steps=6, save_every=2, keep_last=3)
    run = tmp_path / "run"
    train(p, tiny_model_dir, toy_data, run, "qlora")
    assert checkpoints(run / "checkpoints") == [2, 4]
    (run / "result.json").unlink()  # as if the run died after its step-4 checkpoint
    w = run / "checkpoints" / "step-000004" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    lines: list[str] = []
    res = train(p, tiny_model_dir, toy_data, run, "qlora", on_log=lines.append)
    assert res["resumed_from"] == 2
    named = [ln for ln in lines if "step 4 unusable" in ln]
    assert len(named) == 1 and str(w) in named[0], lines


def test_damaged_final_adapter_is_rebuilt_not_reused(tiny_model_dir, toy_data, tmp_path):
    p = tiny_params(tiny_model_dir, max_steps=4, save_every=2)
    run = tmp_path / "run"
    first = train(p, tiny_model_dir, toy_data, run, "qlora")
    good = {k: v.clone() for k, v in adapter(run).items()}  # load_file mmaps: copy before the file is cut
    w = run / "adapter" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    lines: list[str] = []
    res = train(p, tiny_model_dir, toy_data, run, "qlora", on_log=lines.append)
    assert any("damaged" in ln and str(w) in ln for ln in lines), lines
    assert res["resumed_from"] == 2 and first["resumed_from"] is None
    again = adapter(run)
    assert all(torch.allclose(good[k], again[k], atol=1e-5) for k in good)  # rebuilt from the step-2 checkpoint
