"""Run one training (tasks.train) in a fresh Python process and hand back its result.

Why a process per training: QLoRA and the LoRA baseline ran one after the other in one process, so
the second inherited the first's high-water mark (and whatever glibc had not returned), and the
logged peak of LoRA was really QLoRA's. A fresh process starts from the after-import baseline, its
peak (ru_maxrss) is that training's alone, and all of it goes back to the OS when it exits.

The child's errors keep their class, so exit codes and retry decisions are the same as in-process:
it writes {"error", "message"} to <out>/error.json and exits 3 (DivergenceError) or 2 (bad params
or data); here that becomes the same exception again.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from tasks.config import Params

ERROR_FILE = "error.json"
# glibc's dynamic mmap threshold grows to the largest freed block, after which activations come from
# the heap and are never returned between steps (RSS climbs step by step). A fixed threshold keeps
# large tensors in their own mappings, freed back to the OS when released. 1 MiB, not 64 KiB: on the
# default config (bench/RESULTS.md, 10 steps each, idle machine) 64 KiB held step peaks at ~850 MiB but
# took 6-9 s a step (a fresh zeroed mapping for every mid-size tensor); 1 MiB took 3-6 s with peaks
# flat at ~1.2 GB, under the process's own load peak and the 1.5 GB target. Set the variable to choose.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576"}


def train_subprocess(params: Params, base_dir: Path, data_dir: Path, out_dir: Path, kind: str,
                     on_log: Callable[[str], None] = print) -> dict:
    from tasks.data import DataError
    from tasks.modeling import DivergenceError
    from tasks.util import atomic_write_json, popen_child, read_json

    out_dir = Path(out_dir)
    if (out_dir / "result.json").is_file():  # finished earlier: no process to start (train() would reuse it too)
        on_log(f"[{kind}] finished run found in {out_dir}: reusing it")
        return read_json(out_dir / "result.json")
    out_dir.mkdir(parents=True, exist_ok=True)
    pfile = out_dir / "params.json"  # JSON is YAML: load_params validates it exactly as a params file
    atomic_write_json(pfile, params.model_dump(mode="json"))
    (out_dir / ERROR_FILE).unlink(missing_ok=True)
    env = {**os.environ, **{k: v for k, v in CHILD_ENV.items() if k not in os.environ}}
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "tasks.train", "--params", str(pfile), "--kind", kind, "--base-dir", str(base_dir),
           "--data-dir", str(data_dir), "--out", str(out_dir)]
    # stderr is inherited: the progress bar (a live bar on a terminal) and warnings go straight through;
    # stdout lines are the loop's log, re-printed here so a flow's log_prints sends them to Prefect.
    # popen_child: the training dies with this process even on kill -9 (a GPU worker's flow run, where no
    # `qlora-ops run` set QLORA_OPS_DIE_WITH_PARENT, must not leave a training holding the GPU).
    proc = popen_child(cmd, env=env, stdout=subprocess.PIPE, text=True, bufsize=1)
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line and not line.startswith("{"):  # the last line is the result JSON, read from result.json
                on_log(line)
        rc = proc.wait()
    finally:
        if proc.poll() is None:  # cancelled or timed out here: the child must not outlive its stage
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if rc == 0:
        return read_json(out_dir / "result.json")
    err = out_dir / ERROR_FILE
    info = read_json(err) if err.is_file() else {}
    msg = info.get("message") or f"training subprocess ({kind}) exited with code {rc}"
    if rc == 3:
        raise DivergenceError(msg)
    if rc == 2:
        raise DataError(msg)
    raise RuntimeError(f"{msg} ({' '.join(cmd)})")
