"""Run one training (tasks.train.loop) in a fresh Python process and hand back its result.

Why a process per training: QLoRA and the LoRA baseline ran one after the other in one process, so
the second inherited the first's high-water mark (and whatever glibc had not returned), and the
logged peak of LoRA was really QLoRA's. A fresh process starts from the after-import baseline, its
peak (ru_maxrss) is that training's alone, and all of it goes back to the OS when it exits.

The child's errors keep their class, so exit codes and retry decisions are the same as in-process:
it writes {"error", "message"} to <out>/error.json and exits 3 (DivergenceError) or 2 (bad params
or data); here that becomes the same exception again.

training.processes > 1 (tasks.core.hardware.resolve_processes: auto = one per visible GPU): the child is
`accelerate launch` with the shipped infra/accelerate config of training.distributed, and it starts one
training process per rank (tasks.train.distributed). Rank 0 alone writes result.json and error.json and
prints the log; the launcher's exit code is its own (1 when a rank failed), so the class then comes from
error.json. One process is exactly the command it always was.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import yaml

from qlora_ops.tasks.core.child import in_process
from qlora_ops.tasks.core.config import Params
from qlora_ops.tasks.core.hardware import device, resolve_processes
from qlora_ops.tasks.core.util import TIE_ENV, atomic_write_json, end_child, popen_child, read_json
from qlora_ops.tasks.data.prepare import DataError

ERROR_FILE = "error.json"
# The launch configs users run by hand (docs/multi-gpu.md); the pipeline launches with the same ones.
# In a wheel infra/ is the package qlora_ops.infra, beside tasks/ as in the checkout.
ACCELERATE_DIR = Path(__file__).resolve().parents[2] / "infra" / "accelerate"
ACCELERATE_CONFIGS = {"ddp": "ddp.yaml", "fsdp": "fsdp_qlora.yaml"}
# The training's allocator. glibc keeps a training's freed mid-size tensors in fragmented heap arenas
# (the RSS grows ~500 MB over the live set; with its dynamic mmap threshold a cls256 QLoRA training
# peaked at 4.4 GB), and a fixed low mmap threshold that returns them costs a zeroed mapping per
# tensor (1.7-2x slower steps). jemalloc, preloaded as PyTorch's own CPU launcher does
# (torch.backends.xeon.run_cpu --enable-jemalloc), keeps fragmentation low; told never to purge
# (decay -1) and to serve big tensors from the same arenas (oversize_threshold 0: by default those go
# to an arena that returns pages at once, so every 12 MB activation was page-faulted again), a step
# reuses the last step's pages: heap speed at a peak near the live set. The process only trains and
# exits, which is when its memory goes back. bench/RESULTS.md has the measurements. Without
# libjemalloc.so.2 on the machine: glibc with a fixed 1 MiB threshold. Either is skipped when the
# environment already sets LD_PRELOAD / MALLOC_MMAP_THRESHOLD_: the caller has chosen.
# Never purging is safe only with gradient checkpointing (the default): a step then holds one layer's
# activations at a time and the retained pages stay near the live set (40 default steps: 1006 MiB).
# Without it the step's activations vary by hundreds of MB with the batch width and never-purge kept
# 7-10 GB after 8-12 steps; a 30 s decay then held it at 2.2 GB. bench/RESULTS.md.
JEMALLOC_CONF = "oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"
JEMALLOC_CONF_NO_CHECKPOINTING = "oversize_threshold:0,dirty_decay_ms:30000,muzzy_decay_ms:30000"
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")
GLIBC_FALLBACK = {"MALLOC_MMAP_THRESHOLD_": "1048576"}


def jemalloc(env: dict[str, str] | None = None) -> str | None:
    for p in ((env or os.environ).get("QLORA_OPS_JEMALLOC"), *JEMALLOC_PATHS):
        if p and os.path.isfile(p):
            return p
    return None


_noted = False  # the missing-jemalloc note is said once per process (QLoRA and LoRA train from the same one)


def allocator_note(base: dict[str, str] | None = None) -> str | None:
    """The one-time note when the training child will run without jemalloc although nobody chose that
    (no LD_PRELOAD / MALLOC_MMAP_THRESHOLD_ set, QLORA_OPS_JEMALLOC not off): what it costs, how to get it.
    None when jemalloc is used, the caller chose, or the note was already given."""
    global _noted
    env = os.environ if base is None else base
    if _noted or "LD_PRELOAD" in env or "MALLOC_MMAP_THRESHOLD_" in env or env.get("QLORA_OPS_JEMALLOC") == "off" \
            or jemalloc(env):
        return None
    _noted = True
    if sys.platform != "linux":
        return ("note: training runs on the system allocator (jemalloc is preloaded on Linux only; the memory figures "
                "in bench/RESULTS.md are Linux's)")
    return ("note: libjemalloc.so.2 not found, so training runs on glibc with a 1 MiB mmap threshold: about 0.5 GB more "
            "memory per training (bench/RESULTS.md, default config: RSS ~1.32 GB instead of ~0.80 GB) at about the same "
            "speed. To get jemalloc: `sudo apt-get install libjemalloc2` (Debian/Ubuntu), `sudo dnf install jemalloc` "
            "(Fedora), or QLORA_OPS_JEMALLOC=/path/to/libjemalloc.so.2; QLORA_OPS_JEMALLOC=off keeps glibc without this note")


def child_env(base: dict[str, str] | None = None, checkpointing: bool = True) -> dict[str, str]:
    """The training child's environment: `base` (default os.environ) plus the allocator choice above.
    QLORA_OPS_JEMALLOC=off keeps glibc; QLORA_OPS_JEMALLOC=/path/libjemalloc.so.2 names another library."""
    env = dict(os.environ if base is None else base)
    if "LD_PRELOAD" in env or "MALLOC_MMAP_THRESHOLD_" in env:
        return env
    lib = jemalloc(env) if env.get("QLORA_OPS_JEMALLOC") != "off" else None
    if lib:
        conf = JEMALLOC_CONF if checkpointing else JEMALLOC_CONF_NO_CHECKPOINTING
        return {**env, "LD_PRELOAD": lib, "MALLOC_CONF": env.get("MALLOC_CONF", conf)}
    return {**env, **GLIBC_FALLBACK}


def accelerate_config(distributed: str, world: int, cuda: bool) -> dict:
    """The shipped accelerate config of `distributed`, adapted to this launch: it hard-codes
    num_processes: 2 (its users' example) and use_cpu: false. On CPU use_cpu: true keeps accelerate's
    multi-process launcher (`--cpu` would start a single process) with gloo (Dist: Accelerator(cpu=True))."""
    cfg = yaml.safe_load((ACCELERATE_DIR / ACCELERATE_CONFIGS[distributed]).read_text())
    cfg.update(num_processes=world, use_cpu=not cuda)
    return cfg


def launch_command(args: list[str], world: int, config_file: Path | None = None) -> list[str]:
    """The command that trains: this Python on tasks.train for one process (the command it always was),
    else `accelerate launch` of the same module with the same arguments. accelerate rather than torchrun
    for DDP too: one launcher for both kinds of sharing, FSDP's settings reach the ranks only through it
    (ACCELERATE_USE_FSDP, FSDP_*), and it is what docs/multi-gpu.md tells users to run by hand.
    --num_processes overrides the config's; --main_process_port 0: accelerate takes a free port, so two
    trainings on one machine (tests, a second worker) never meet on the default 29500."""
    train = ["-m", "qlora_ops.tasks.train", *args]
    if world == 1:
        return [sys.executable, *train]
    if config_file is None:
        raise ValueError("a launch of more than one process needs its accelerate config file")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            "--num_processes", str(world), "--main_process_port", "0", *train]


def error_class(rc: int, info: dict) -> str | None:
    """Which exception a failed child stands for: by its exit code (one process: 3 diverged, 2 bad params
    or data), else by error.json's class (a launcher exits 1 whatever its ranks exited with)."""
    if rc == 3 or info.get("error") == "DivergenceError":
        return "DivergenceError"
    if rc == 2 or info.get("error") in ("DataError", "ParamsError"):
        return "DataError"
    return None


def train_subprocess(params: Params, base_dir: Path, data_dir: Path, out_dir: Path, kind: str,
                     on_log: Callable[[str], None] = print) -> dict:
    # modeling imports torch: the parent that only starts the training child stays without it
    from qlora_ops.tasks.model.modeling import DivergenceError

    out_dir = Path(out_dir)
    if (out_dir / "result.json").is_file():  # finished earlier: no process to start (train() would reuse it too)
        on_log(f"[{kind}] finished run found in {out_dir}: reusing it")
        return read_json(out_dir / "result.json")
    world = resolve_processes(params)
    if world == 1 and in_process() and device().type != "cuda":
        return _train_here(params, base_dir, data_dir, out_dir, kind, on_log)
    out_dir.mkdir(parents=True, exist_ok=True)
    pfile = out_dir / "params.json"  # JSON is YAML: load_params validates it exactly as a params file
    atomic_write_json(pfile, params.model_dump(mode="json"))
    (out_dir / ERROR_FILE).unlink(missing_ok=True)
    if note := allocator_note():
        on_log(note)
    env = child_env(checkpointing=params.training.gradient_checkpointing)
    args = ["--params", str(pfile), "--kind", kind, "--base-dir", str(base_dir), "--data-dir", str(data_dir), "--out", str(out_dir)]
    config_file = None
    if world > 1:
        config_file = out_dir / f"accelerate-{params.training.distributed}.yaml"  # beside the run: what launched it
        config_file.write_text(yaml.safe_dump(accelerate_config(params.training.distributed, world, device().type == "cuda")))
        # Each rank dies with the launcher (die_with_parent_if_tied), as the launcher dies with this process.
        env[TIE_ENV] = "1"
        on_log(f"[{kind}] {world} processes ({params.training.distributed}): accelerate launch --config_file {config_file}")
    cmd = launch_command(args, world, config_file)
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
        end_child(proc)  # cancelled or timed out here: the child must not outlive its stage
    if rc == 0:
        return read_json(out_dir / "result.json")
    err = out_dir / ERROR_FILE
    info = read_json(err) if err.is_file() else {}
    msg = info.get("message") or f"training subprocess ({kind}) exited with code {rc}"
    cls = error_class(rc, info)
    if cls == "DivergenceError":
        raise DivergenceError(msg)
    if cls == "DataError":
        raise DataError(msg)
    raise RuntimeError(f"{msg} ({' '.join(cmd)})")


def _train_here(params: Params, base_dir: Path, data_dir: Path, out_dir: Path, kind: str,
                on_log: Callable[[str], None]) -> dict:
    """One CPU training in this process, under $QLORA_STAGES_IN_PROCESS=1 (tasks.core.child: the test suite's
    switch): the child's start-up (torch, transformers, peft, bitsandbytes imports: 5-10 s on 2 loaded cores)
    is most of a tiny model's training, twice in every run of the flow. The same loop, the same result.json
    and the same exception classes; the caller's torch thread count is given back (launch() sets the
    params' own). A user's run always trains in a child (the module docstring says why); so does CUDA."""
    import torch

    from qlora_ops.tasks.train.loop import train  # torch, transformers, peft: only when training here

    threads = torch.get_num_threads()
    try:
        return train(params, base_dir, data_dir, out_dir, kind, on_log=on_log)
    finally:
        torch.set_num_threads(threads)
