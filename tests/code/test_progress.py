"""tasks.core.progress: a tqdm bar on a terminal, a plain line every ~10 % elsewhere, nothing when switched off."""
from __future__ import annotations

import re

import pytest

from qlora_ops.tasks.core.progress import Progress, fmt_duration, fmt_value, progress


def run(total: int, updates: int, step: int = 1, initial: int = 0, **postfix) -> None:
    with progress(total, "train qlora", unit="step", initial=initial) as bar:
        for _ in range(updates):
            bar.update(step, **postfix)


def test_lines_every_ten_percent_and_at_the_end(monkeypatch, capsys):
    monkeypatch.setenv("QLORA_OPS_PROGRESS", "auto")  # pytest's captured stderr is not a terminal
    run(40, 40, loss=0.51234, **{"tok/s": 1234.5})
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 10  # 4/40, 8/40, ... 40/40
    assert re.fullmatch(r"train qlora: 10% 4/40 loss=0\.512 tok/s=1234 \S+ step/s eta \S+", lines[0]), lines[0]
    assert re.fullmatch(r"train qlora: 100% 40/40 loss=0\.512 tok/s=1234 \S+ step/s in \S+", lines[-1]), lines[-1]


def test_resumed_run_counts_from_initial_and_close_writes_the_last_state(monkeypatch, capsys):
    monkeypatch.setenv("QLORA_OPS_PROGRESS", "lines")
    run(40, 5, initial=20)  # resumed at step 20, stopped early at 25
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split()[3] for ln in lines] == ["24/40", "25/40"]  # 60 % crossed at 24; close() adds 25


def test_a_failure_does_not_write_a_last_progress_line(monkeypatch, capsys):
    monkeypatch.setenv("QLORA_OPS_PROGRESS", "lines")
    with pytest.raises(RuntimeError):
        with progress(40, "eval base", unit="rows") as bar:
            bar.update(3)
            raise RuntimeError("boom")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("value", ["off", "0", "false"])
def test_off_writes_nothing(monkeypatch, capsys, value):
    monkeypatch.setenv("QLORA_OPS_PROGRESS", value)
    run(10, 10, loss=1.0)
    assert capsys.readouterr().err == ""


def test_bar_mode_is_tqdm(monkeypatch, capsys):
    monkeypatch.setenv("QLORA_OPS_PROGRESS", "bar")
    run(10, 10, loss=0.25)
    err = capsys.readouterr().err
    assert "\r" in err and "10/10" in err and "loss=0.25" in err and "step/s" in err


def test_formatting():
    assert [fmt_value(v) for v in (0.51234, 1234.5, 3, 1e-5, 12.345)] == ["0.512", "1234", "3", "1e-05", "12.3"]
    assert [fmt_duration(s) for s in (3.21, 45, 80, 3725)] == ["3.2s", "45s", "1m20s", "1h02m"]
    p = Progress(0, "empty", how="lines")
    p.update(2)
    assert p.line().startswith("empty: 2")
