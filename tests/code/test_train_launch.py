"""training.processes: how many processes the pipeline launches (tasks.core.hardware.resolve_processes) and
the command it launches them with (tasks.train.process.launch_command), without launching anything."""
from __future__ import annotations

import sys

import pytest
import torch

from qlora_ops.tasks.core.config import Params, ParamsError
from qlora_ops.tasks.core.hardware import resolve_processes
from qlora_ops.tasks.train import process as P

ARGS = ["--params", "p.json", "--kind", "qlora", "--base-dir", "b", "--data-dir", "d", "--out", "o"]


def gpus(monkeypatch, n: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


@pytest.mark.parametrize("n, auto", [(0, 1), (1, 1), (4, 4)])
def test_auto_is_one_process_per_visible_gpu_and_one_on_cpu(monkeypatch, n, auto):
    gpus(monkeypatch, n)
    assert resolve_processes(Params()) == auto  # the default is auto
    assert resolve_processes(Params(training={"processes": 1})) == 1


def test_explicit_processes(monkeypatch):
    gpus(monkeypatch, 0)
    assert resolve_processes(Params(training={"processes": 3})) == 3  # CPU: gloo runs any number
    gpus(monkeypatch, 2)
    assert resolve_processes(Params(training={"processes": 2})) == 2
    with pytest.raises(ParamsError, match=r"training\.processes=4 but this machine sees 2 GPU.*training\.processes: auto"):
        resolve_processes(Params(training={"processes": 4}))


@pytest.mark.parametrize("bad", [0, -1, "two", 1.5, True, None])
def test_processes_must_be_auto_or_a_positive_whole_number(tmp_path, bad):
    from qlora_ops.tasks.core.config import load_params

    f = tmp_path / "p.yaml"
    f.write_text(f"training:\n  processes: {'null' if bad is None else bad}\n")
    with pytest.raises(ParamsError, match=r"training\.processes: .*training\.processes must be auto"):
        load_params(f)


def test_fsdp_needs_processes_and_float_storage():
    with pytest.raises(ValueError, match=r"training\.distributed=fsdp .* training\.processes is 1"):
        Params(training={"processes": 1, "distributed": "fsdp"}, quantization={"quant_storage": "bfloat16"})
    with pytest.raises(ValueError, match=r"training\.distributed=fsdp needs a float quantization\.quant_storage"):
        Params(training={"distributed": "fsdp"})
    Params(training={"processes": 2, "distributed": "fsdp"}, quantization={"quant_storage": "bfloat16"})


def test_one_process_is_the_command_it_always_was():
    assert P.launch_command(ARGS, 1) == [sys.executable, "-m", "qlora_ops.tasks.train", *ARGS]


def test_two_processes_launch_through_accelerate_with_the_world_size_and_a_free_port(tmp_path):
    cf = tmp_path / "accelerate-ddp.yaml"
    cmd = P.launch_command(ARGS, 2, cf)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--config_file") + 1] == str(cf)
    assert cmd[cmd.index("--num_processes") + 1] == "2"  # overrides the config's num_processes
    assert cmd[cmd.index("--main_process_port") + 1] == "0"  # accelerate picks a free one
    assert cmd[-len(ARGS) - 2:] == ["-m", "qlora_ops.tasks.train", *ARGS]  # the same module, the same arguments
    with pytest.raises(ValueError):
        P.launch_command(ARGS, 2)


@pytest.mark.parametrize("dist, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP")])
def test_shipped_accelerate_configs_are_adapted_to_the_launch(dist, kind):
    cpu = P.accelerate_config(dist, 3, cuda=False)
    assert cpu["distributed_type"] == kind and cpu["num_processes"] == 3 and cpu["use_cpu"] is True
    gpu = P.accelerate_config(dist, 4, cuda=True)
    assert gpu["num_processes"] == 4 and gpu["use_cpu"] is False
    if dist == "fsdp":
        assert gpu["fsdp_config"]["fsdp_version"] == 1


def test_a_launcher_failure_keeps_the_class_from_error_json():
    assert P.error_class(3, {}) == "DivergenceError" and P.error_class(2, {}) == "DataError"  # one process
    assert P.error_class(1, {"error": "DivergenceError"}) == "DivergenceError"  # accelerate's exit code is 1
    assert P.error_class(1, {"error": "ParamsError"}) == "DataError"
    assert P.error_class(1, {}) is None


def test_each_rank_draws_its_own_dropout_only_with_several_processes():
    """tasks.train.loop.seed_dropout, called once the model is built and wrapped: one process keeps the
    RNG stream seeded with `seed` (its numbers bit for bit); several get one stream per rank, reproducible."""
    from types import SimpleNamespace as NS

    from qlora_ops.tasks.train.loop import seed_dropout

    def draw(world: int, rank: int) -> torch.Tensor:
        torch.manual_seed(42)
        seed_dropout(NS(params=Params(seed=42), dist=NS(world=world, rank=rank)))
        return torch.rand(8)

    assert torch.equal(draw(1, 0), (torch.manual_seed(42), torch.rand(8))[1])
    r0, r1 = draw(2, 0), draw(2, 1)
    assert not torch.equal(r0, r1) and torch.equal(r0, draw(2, 0)) and torch.equal(r1, draw(2, 1))
