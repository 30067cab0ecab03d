"""A model stage meant for a GPU refuses to train without one (issue 18), before any work, naming the pool,
the image and the params key that says CPU is intended."""
from __future__ import annotations

import pytest

from qlora_ops.tasks.core.config import Params


def _no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_the_gpu_pool_stage_refuses_to_train_without_cuda(tmp_path, monkeypatch):
    from qlora_ops.flows.device_check import NoCudaDevice
    from qlora_ops.flows.model_stage import model_stage

    _no_cuda(monkeypatch)
    monkeypatch.setenv("QLORA_OPS_IMAGE", "registry.example/qlora-ops/worker-gpu:1.2")
    p = Params(orchestration={"gpu_pool": "team-gpu"})
    with pytest.raises(NoCudaDevice) as e:  # before MLflow, data or the base model are touched
        model_stage.fn(params=p.model_dump(mode="json"), run_id="no-such-run", data_uri=str(tmp_path / "none"),
                       test_hash="x", workspace=str(tmp_path))
    msg = str(e.value)
    assert "work pool 'team-gpu'" in msg and "registry.example/qlora-ops/worker-gpu:1.2" in msg, msg
    assert "no CUDA device" in msg and "orchestration.gpu_required: false" in msg, msg
    assert not (tmp_path / ".qlora-ops").exists()  # nothing written


@pytest.mark.parametrize("orchestration, refused", [
    ({"gpu_pool": None}, False),                          # the laptop path: in-process, CPU is fine
    ({"gpu_pool": "gpu", "gpu_required": False}, False),  # CPU intended on that pool
    ({"gpu_pool": None, "gpu_required": True}, True),     # a GPU demanded in-process too
    ({"gpu_pool": "gpu"}, True),
])
def test_who_needs_a_gpu(orchestration, refused, monkeypatch):
    from qlora_ops.flows.device_check import NoCudaDevice, require_cuda

    _no_cuda(monkeypatch)
    p = Params(orchestration=orchestration)
    if refused:
        with pytest.raises(NoCudaDevice, match="none: a process worker"):
            require_cuda(p)
    else:
        require_cuda(p)


def test_heartbeat_window_must_tolerate_a_late_heartbeat():
    with pytest.raises(Exception, match="heartbeat_timeout_s"):
        Params(orchestration={"heartbeat_s": 60, "heartbeat_timeout_s": 90})
    with pytest.raises(Exception, match="greater than or equal to 30"):
        Params(orchestration={"heartbeat_s": 10})  # Prefect's own minimum


def test_a_gpu_pool_without_cuda_is_a_params_fault_for_the_parent_too():
    from qlora_ops.flows.cli.exit_codes import classify
    from qlora_ops.flows.device_check import NoCudaDevice
    from qlora_ops.flows.remote_stage import ModelStageFailed

    msg = "qlora-model-stage/x run 1 ended Failed: ... set orchestration.gpu_required: false in the params if CPU is intended"
    assert classify(ModelStageFailed(msg)) == "bad_input"  # exit 2, as in-process
    assert classify(NoCudaDevice("no CUDA")) == "bad_input"
