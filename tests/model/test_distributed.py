"""The multi-process path on CPU with real torch.distributed (gloo), launched as a user launches it
(`torchrun --nproc_per_node 2`, `accelerate launch --config_file infra/accelerate/fsdp_qlora.yaml`):
2 processes give the 1-process optimizer steps (loss, gradient norm, LoRA weights) with and without
gradient accumulation, DDP all-reduces once per optimizer step, FSDP really shards the 4-bit model
and clips by the global norm, and launches that cannot work are refused before any model is loaded.

bitsandbytes' 4-bit layers wrap under FSDP1 on CPU with a float quant_storage and peft's wrap policy
(tasks.train.distributed), so the FSDP run here is QLoRA itself, with quant_storage float32 (the CPU compute
dtype); bf16 storage is checked for its dtype rules in-process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qlora_ops.tasks.core.config import ParamsError
from qlora_ops.tasks.model.modeling import add_lora, load_model
from qlora_ops.tasks.train.checkpoints import checkpoints
from qlora_ops.tasks.train.loop import train
from tests.conftest import ROOT, free_port, tiny_params, write_toy_splits

TOL = 1e-5


def dist_params(model_dir: Path, **training):
    """2 optimizer steps over a global batch of 8; no dropout (each rank would draw its own masks);
    warmup 0 so both steps move the weights; a checkpoint after step 1 (per-rank trainer states)."""
    t = dict(max_steps=2, batch_size=8, eval_every=2, save_every=1, warmup_steps=0)
    p = tiny_params(model_dir, **{**t, **training})
    return p.model_copy(update={"lora": p.lora.model_copy(update={"dropout": 0.0}),
                                "quantization": p.quantization.model_copy(update={"quant_storage": "float32"})})


def write_params(p, path: Path) -> Path:
    path.write_text(yaml.safe_dump(p.model_dump(mode="json")))
    return path


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def assert_same_steps(run: Path, ref: Path) -> None:
    """Every optimizer step's loss and gradient norm, and the final LoRA weights, within TOL."""
    h, r = history(run), history(ref)
    assert [x["step"] for x in h] == [x["step"] for x in r] == [1, 2]
    for a, b in zip(h, r):
        for k in ("train_loss", "grad_norm"):
            assert abs(a[k] - b[k]) < TOL, (k, a["step"], a[k], b[k])
    wa, wb = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (run, ref))
    assert wa.keys() == wb.keys()
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    moved = max(float(wb[k].abs().max()) for k in wb if "lora_B" in k)
    assert diff < TOL and moved > 100 * TOL, (diff, moved)  # equal, and the steps really moved the weights


def rank_files(run: Path) -> list[dict]:
    return [json.loads((run / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ACCELERATE_USE_FSDP", None)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *args]


def write_varied_splits(d: Path) -> Path:
    """The toy task with completions of 1-4 words: ranks and micro-batches then hold different numbers
    of completion tokens, so a mean of per-rank (or per-micro-batch) means is not the global mean."""
    write_toy_splits(d)
    for split in ("train", "val", "test"):
        rows = [json.loads(line) for line in (d / f"{split}.jsonl").read_text().splitlines()]
        for i, r in enumerate(rows):
            r["completion"] = " ".join([r["completion"]] * (1 + (i * 7) % 4))
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_varied_splits(tmp_path_factory.mktemp("dist-data"))


@pytest.fixture(scope="module")
def single(tiny_model_dir, data, tmp_path_factory) -> Path:
    """The reference: one process, global batch 8, no accumulation."""
    out = tmp_path_factory.mktemp("single") / "run"
    train(dist_params(tiny_model_dir), tiny_model_dir, data, out, "qlora")
    return out


def plain_loop(p, model_dir: Path, data: Path, kind: str) -> tuple[dict, list[tuple[float, float]]]:
    """The loop's arithmetic before multi-process normalisation, written out: mean loss of each batch,
    backward, clip the trainable parameters, AdamW step (the default path's numbers come from this)."""
    import random

    from transformers import get_scheduler

    from qlora_ops.tasks.model.prompting import encode
    from qlora_ops.tasks.train.batches import batch_loss, batch_order, make_batch
    from qlora_ops.tasks.train.checkpoints import adapter_state
    from qlora_ops.tasks.train.loop import make_optimizer
    from qlora_ops.tasks.core.util import read_jsonl

    tp, cpu = p.training, torch.device("cpu")
    torch.set_num_threads(tp.threads)
    torch.manual_seed(p.seed)
    random.seed(p.seed)
    model, tok = load_model(model_dir, p, kind == "qlora", cpu)
    model = add_lora(model, p, kind == "qlora")
    rows = [encode(tok, r, p.model.max_seq_len) for r in read_jsonl(data / "train.jsonl")]
    opt, _ = make_optimizer(model, p, cpu)
    sched = get_scheduler(tp.lr_scheduler, opt, num_warmup_steps=tp.warmup_steps, num_training_steps=tp.max_steps)
    model.train()
    steps = []
    for step in range(tp.max_steps):
        batch = make_batch([rows[i] for i in batch_order(len(rows), step, tp.batch_size, p.seed)], tok.pad_token_id, p)
        loss, _ = batch_loss(model, batch, cpu)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], tp.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        steps.append((loss.item(), float(gn)))
    return adapter_state(model), steps


def test_one_process_without_accumulation_keeps_its_arithmetic_bit_for_bit(tiny_model_dir, data, tmp_path):
    """The default path (1 process, grad_accum 1, dropout on) is the plain loop to the last bit: the
    global-token normalisation divides by the same count, so the default run's scores cannot move."""
    p = tiny_params(tiny_model_dir, max_steps=3, eval_every=100, save_every=2, warmup_steps=1)
    assert p.lora.dropout > 0 and p.training.grad_accum == 1
    res = train(p, tiny_model_dir, data, tmp_path / "run", "qlora")
    ref, ref_steps = plain_loop(p, tiny_model_dir, data, "qlora")
    got = load_file(Path(res["adapter_dir"]) / "adapter_model.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert [(h["train_loss"], h["grad_norm"]) for h in history(tmp_path / "run")] == ref_steps


def test_one_process_accumulation_equals_the_full_batch(tiny_model_dir, data, single, tmp_path):
    """2 micro-batches of 4 with unequal token counts: the same step as one batch of 8."""
    train(dist_params(tiny_model_dir, batch_size=4, grad_accum=2), tiny_model_dir, data, tmp_path / "acc", "qlora")
    assert_same_steps(tmp_path / "acc", single)


def test_fsdp_dtype_rules_on_the_4bit_model(tiny_model_dir):
    """FSDP flattens each unit into one tensor: with bf16 storage the packed 4-bit weights are bf16,
    every other frozen float (norms, embeddings) is cast to bf16; LoRA keeps fp32 (units of its own)."""
    import bitsandbytes as bnb

    from qlora_ops.tasks.train.distributed import prepare_for_fsdp

    p = tiny_params(tiny_model_dir)
    p = p.model_copy(update={"quantization": p.quantization.model_copy(update={"quant_storage": "bfloat16"})})
    model, _ = load_model(tiny_model_dir, p, quantized=True)
    w = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)).weight
    assert w.dtype == torch.bfloat16 and w.quant_state.quant_type == "nf4"  # packed nibbles stored as bf16
    model = add_lora(model, p, quantized=True)
    assert len({q.dtype for q in model.parameters() if not q.requires_grad}) > 1  # fp32 norms before the cast
    assert prepare_for_fsdp(model, torch.bfloat16) == {torch.bfloat16}
    assert {q.dtype for q in model.parameters() if q.requires_grad} == {torch.float32}
    out = model(input_ids=torch.tensor([[1, 2, 3]])).logits  # still a working model after the cast
    assert torch.isfinite(out).all()


def test_fsdp_with_uint8_storage_is_refused_before_any_model_is_loaded(tiny_model_dir, tmp_path, monkeypatch):
    """The environment `accelerate launch` gives an FSDP config; the default quant_storage (uint8)."""
    import qlora_ops.tasks.train.loop as T

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the launch was checked")

    monkeypatch.setattr(T, "load_model", no_load)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    p = tiny_params(tiny_model_dir)
    assert p.quantization.quant_storage == "uint8"
    with pytest.raises(ParamsError, match=r"quantization\.quant_storage=uint8 .*FSDP.*bfloat16"):
        train(p, tiny_model_dir, tmp_path / "data", tmp_path / "run", "qlora")
    from qlora_ops.tasks.train.distributed import check_launch

    check_launch(p, "lora")  # the LoRA baseline stores no 4-bit weights: nothing to refuse
    float_storage = p.model_copy(update={"quantization": p.quantization.model_copy(update={"quant_storage": "bfloat16"})})
    check_launch(float_storage, "qlora")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")  # DDP: the packed weights are never flattened
    check_launch(p, "qlora")


@pytest.mark.slow
def test_batch_smaller_than_world_is_refused(tiny_model_dir, data, tmp_path):
    pf = write_params(dist_params(tiny_model_dir, batch_size=1), tmp_path / "p.yaml")
    r = run(torchrun("-m", "qlora_ops.tasks.train", "--params", str(pf), "--kind", "qlora", "--base-dir", str(tiny_model_dir),
                     "--data-dir", str(data), "--out", str(tmp_path / "run")), timeout=300)
    assert r.returncode != 0
    assert "training.batch_size=1 is smaller than the number of processes (2)" in r.stderr, r.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "error.json").read_text())["error"] == "ParamsError"  # exit 2's class
    assert not (tmp_path / "run" / "history.jsonl").exists()


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_and_without_accumulation(tiny_model_dir, data, single, tmp_path):
    """torchrun, 2 processes: global batch 8 as one micro-batch, and as 2 accumulated micro-batches of
    4; both give the 1-process steps. DDP all-reduces once per optimizer step, not per micro-batch."""
    plain = write_params(dist_params(tiny_model_dir), tmp_path / "plain.yaml")
    accum = write_params(dist_params(tiny_model_dir, batch_size=4, grad_accum=2), tmp_path / "accum.yaml")
    r = run(torchrun("tests/model/dist_worker.py", str(tiny_model_dir), str(data), str(tmp_path),
                     f"plain={plain}", f"accum={accum}"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in ("plain", "accum"):
        out = tmp_path / name
        res = json.loads((out / "result.json").read_text())
        assert res["processes"] == 2 and res["steps"] == 2
        assert_same_steps(out, single)
        ranks = rank_files(out)
        assert [x["wrapper"] for x in ranks] == ["DistributedDataParallel"] * 2
        assert ranks[0]["steps"] == ranks[1]["steps"]  # the same loss and norm on both ranks
        ck = out / "checkpoints" / f"step-{checkpoints(out / 'checkpoints')[-1]:06d}"
        assert (ck / "trainer_state.pt").is_file() and (ck / "trainer_state.rank1.pt").is_file()
    syncs = {name: [json.loads((tmp_path / name / f"allreduces-rank{r}.json").read_text()) for r in (0, 1)]
             for name in ("plain", "accum")}
    assert syncs["plain"][0] > 0
    assert syncs["accum"] == syncs["plain"], syncs  # 2 micro-batches per step, still one all-reduce per step


@pytest.mark.slow
def test_fsdp_shards_the_4bit_model_and_clips_by_the_global_norm(tiny_model_dir, data, single, tmp_path):
    """accelerate launch with the shipped FSDP config (on CPU: use_cpu), QLoRA with float32 storage,
    2 accumulated micro-batches: FSDP units on each rank, each holding half of the parameters; the
    clipping norm is the same on both ranks and equals the unsharded (1-process) norm."""
    cfg = yaml.safe_load((ROOT / "infra" / "accelerate" / "fsdp_qlora.yaml").read_text())
    cfg.update(use_cpu=True, num_processes=2, main_process_ip="127.0.0.1", main_process_port=free_port())
    cf = tmp_path / "fsdp_cpu.yaml"
    cf.write_text(yaml.safe_dump(cfg))
    pf = write_params(dist_params(tiny_model_dir, batch_size=4, grad_accum=2), tmp_path / "p.yaml")
    out = tmp_path / "fsdp"
    r = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cf), "-m", "qlora_ops.tasks.train",
             "--params", str(pf), "--kind", "qlora", "--base-dir", str(tiny_model_dir), "--data-dir", str(data),
             "--out", str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count('"kind": "qlora"') == 1  # only rank 0 reports
    ranks = rank_files(out)
    for x in ranks:
        assert x["wrapper"] == "FullyShardedDataParallel" and x["fsdp"] and x["fsdp_units"] > 2
        assert x["full_numel"] / 2 <= x["local_numel"] < 0.55 * x["full_numel"], x  # a half (+ padding) per rank
    assert ranks[0]["steps"] == ranks[1]["steps"]  # the same global norm on both ranks
    assert_same_steps(out, single)  # ... equal to the unsharded one, and the same update
    ck = out / "checkpoints" / f"step-{checkpoints(out / 'checkpoints')[-1]:06d}"
    assert (ck / "trainer_state.rank1.pt").is_file()  # each rank's optimizer shard


# The pipeline's own launcher (tasks.train.process.train_subprocess) with training.processes: 2, on CPU (gloo).
# Dropout 0 (dist_params): with per-rank dropout seeds the masks differ from one process's, and the
# comparison would measure dropout, not the launch. What is left is float summation order (the gradients'
# all-reduce, the global token count). Measured here (2 steps, 2 micro-batches of 4): losses and gradient
# norms within 5e-7, final val loss within 5e-7 (LoRA: equal); QLoRA adapter weights within 6.5e-7 (DDP and
# FSDP), LoRA's within 1.0e-4: AdamW divides each gradient entry by its own running magnitude, so on
# entries whose gradient is near zero at step 2 (lora_A of layer 1, whose lora_B has moved one step from
# zero) rounding noise of ~1e-7 becomes a part of an lr-sized step. PIPELINE_TOL (losses, norms, QLoRA
# weights) and LORA_WEIGHT_TOL leave 10x headroom (docs/multi-gpu.md, "From the pipeline").
PIPELINE_TOL = 1e-5
LORA_WEIGHT_TOL = 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("kind, distributed", [("qlora", "ddp"), ("qlora", "fsdp"), ("lora", "ddp")])
def test_pipeline_launches_training_processes_and_matches_one_process(tiny_model_dir, data, tmp_path_factory, kind,
                                                                      distributed):
    from qlora_ops.tasks.train.process import train_subprocess

    tmp = tmp_path_factory.mktemp(f"pipeline-{kind}-{distributed}")
    base = dist_params(tiny_model_dir, batch_size=4, grad_accum=2)
    two = base.model_copy(update={"training": base.training.model_copy(update={"processes": 2, "distributed": distributed})})
    logs: list[str] = []
    res = train_subprocess(two, tiny_model_dir, data, tmp / "two", kind, on_log=logs.append)
    ref = train_subprocess(base, tiny_model_dir, data, tmp / "one", kind, on_log=lambda s: None)
    assert res["processes"] == 2 and ref["processes"] == 1
    assert any(f"2 processes ({distributed})" in line for line in logs), logs  # the log came back through the launcher
    assert sum("device=cpu processes=2" in line for line in logs) == 1  # rank 0 alone logs
    cfg = yaml.safe_load((tmp / "two" / f"accelerate-{distributed}.yaml").read_text())
    assert cfg["num_processes"] == 2 and cfg["use_cpu"] is True  # the shipped config's 2 / false overridden
    wrapper = "FullyShardedDataParallel" if distributed == "fsdp" else "DistributedDataParallel"
    assert [x["wrapper"] for x in rank_files(tmp / "two")] == [wrapper] * 2  # really two ranks, really that sharing
    assert not (tmp / "two" / "error.json").exists() and not (tmp / "one" / "ranks").exists()
    assert abs(res["final_val_loss"] - ref["final_val_loss"]) < PIPELINE_TOL, (res["final_val_loss"], ref["final_val_loss"])
    for a, b in zip(history(tmp / "two"), history(tmp / "one")):
        assert abs(a["train_loss"] - b["train_loss"]) < PIPELINE_TOL and abs(a["grad_norm"] - b["grad_norm"]) < PIPELINE_TOL
    wa, wb = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (tmp / "two", tmp / "one"))
    assert wa.keys() == wb.keys()
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    print(f"{kind} {distributed}: max |adapter diff| {diff:.3g}, val loss diff {abs(res['final_val_loss'] - ref['final_val_loss']):.3g}")
    assert diff < (PIPELINE_TOL if kind == "qlora" else LORA_WEIGHT_TOL), diff


@pytest.mark.slow
def test_pipeline_launch_failure_keeps_its_class(tiny_model_dir, data, tmp_path):
    """A refused launch under the launcher (which exits 1 whatever its ranks exit with) is still a DataError
    (exit 2's class, from rank 0's error.json), not a bare RuntimeError."""
    from qlora_ops.tasks.data.prepare import DataError
    from qlora_ops.tasks.train.process import train_subprocess

    p = dist_params(tiny_model_dir, batch_size=1)
    p = p.model_copy(update={"training": p.training.model_copy(update={"processes": 2})})
    with pytest.raises(DataError, match=r"training\.batch_size=1 is smaller than the number of processes \(2\)"):
        train_subprocess(p, tiny_model_dir, data, tmp_path / "run", "qlora", on_log=lambda s: None)
