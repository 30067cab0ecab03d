"""Params validation: bad input fails before any work, naming the file, the key and the fix."""
from __future__ import annotations


import pytest

from qlora_ops.tasks.core.config import Params, ParamsError, load_params
from tests.conftest import ROOT


def test_default_params_load_and_open_with_their_command():
    p = load_params(ROOT / "params" / "default.yaml")
    assert p.quantization.quant_type == "nf4" and p.quantization.double_quant
    assert p.lora.target_modules == "all-linear"
    assert (ROOT / "params" / "default.yaml").read_text().splitlines()[1].strip().startswith("#   qlora-ops run")


def test_unknown_key_is_named_with_allowed_keys(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("training:\n  max_step: 10\n")
    with pytest.raises(ParamsError) as e:
        load_params(f)
    msg = str(e.value)
    assert str(f) in msg and "training.max_step: unknown key" in msg and "max_steps" in msg


def test_bad_value_and_bad_section(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("quantization:\n  quant_type: int3\nlora:\n  r: 0\nmodle: {}\n")
    msg = str(pytest.raises(ParamsError, load_params, f).value)
    assert "quantization.quant_type" in msg and "lora.r" in msg and "modle: unknown key" in msg


def test_missing_and_non_mapping_files(tmp_path):
    assert "not found" in str(pytest.raises(ParamsError, load_params, tmp_path / "nope.yaml").value)
    (tmp_path / "l.yaml").write_text("- a\n- b\n")
    assert "mapping" in str(pytest.raises(ParamsError, load_params, tmp_path / "l.yaml").value)


def test_split_must_leave_training_data(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("data:\n  split: {val: 0.45, test: 0.45}\n")
    assert "data.split" in str(pytest.raises(ParamsError, load_params, f).value)


def test_digest_tracks_sections():
    a, b = Params(), Params(training={"max_steps": 3})
    assert a.digest("data") == b.digest("data") and a.digest("training") != b.digest("training")
