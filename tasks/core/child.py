"""One stage function run in a fresh Python process that returns: its memory goes back to the OS when it
exits, and its peak is its own, not the caller's import baseline plus an earlier stage's leftovers.

    call_in_child("qlora_ops.tasks.evaluate.predict:evaluate_model", params, "base", model_dir, ...)

Why: the flow's process holds Prefect, MLflow, torch, transformers and bitsandbytes (~640 MiB after
imports) and glibc keeps what a stage freed; a 540 MB base loaded there peaked at 1.6-2.0 GB. A child
imports only what its stage needs (~450 MiB) and holds one model (bench/RESULTS.md, "Every stage in a
child"). Stages pass paths and small JSON, so that is all that crosses: the params as a params file
(validated in the child exactly as a params file), Path arguments as paths, the result as JSON.

The child's errors keep their class where it can be rebuilt from a message (DamagedArtifact, DataError,
ValueError, ...), so retry decisions and exit codes are the same as in-process; its peak RSS
(ru_maxrss) is noted for the caller's stage timer (tasks.core.memory.note_child_peak).
"""
from __future__ import annotations

import collections
import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from qlora_ops.tasks.core.config import Params, load_params
from qlora_ops.tasks.core.console import configure, is_debug
from qlora_ops.tasks.core.memory import note_child_peak, process_peak_bytes
from qlora_ops.tasks.core.util import atomic_write_json, die_with_parent_if_tied, end_child, popen_child

RESULT_MARK = "qlora-ops-child-result: "
# "1": run the stages in the calling process (what every stage did before), and a one-process CPU training
# too (tasks.train.process). The test suite sets it: its hundreds of tiny-model stages take a second or two
# each, and a child's start-up (torch, transformers, peft imports: 5-10 s on 2 loaded cores) made the 12-round
# year test 15 min instead of 10. The child path has its own tests (tests/code/test_child.py,
# tests/model/test_train_process.py, and whole runs with children: tests/integration/test_flow.py's first,
# test_crash.py's run killed in training).
IN_PROCESS_ENV = "QLORA_STAGES_IN_PROCESS"


def in_process() -> bool:
    return os.environ.get(IN_PROCESS_ENV) == "1"


class ChildFailed(RuntimeError):
    """A stage's child process failed with an error whose class could not be rebuilt here."""


def _enc(v: Any) -> Any:
    if isinstance(v, Path):
        return {"__path__": str(v)}
    if isinstance(v, Params):
        raise TypeError("Params go first (call_in_child's `params`), once")
    if isinstance(v, (list, tuple)):
        return [_enc(x) for x in v]
    if isinstance(v, dict):
        return {k: _enc(x) for k, x in v.items()}
    return v


def _dec(v: Any) -> Any:
    if isinstance(v, dict):
        return Path(v["__path__"]) if set(v) == {"__path__"} else {k: _dec(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_dec(x) for x in v]
    return v


def _rebuild(info: dict, what: str, stderr_tail: str) -> BaseException:
    msg = info.get("message") or f"{what} failed"
    try:
        cls = getattr(importlib.import_module(info["module"]), info["error"])
        if isinstance(cls, type) and issubclass(cls, Exception):
            return cls(msg)
    except Exception:  # noqa: BLE001 - any failure to rebuild: the generic error below, with the child's stderr
        pass
    return ChildFailed(f"{what} failed in a child process ({info.get('error')}: {msg}): {stderr_tail}")


def call_in_child(target: str, params: Params, *args: Any, force_child: bool = False, **kwargs: Any) -> Any:
    """`module:function`(params, *args, **kwargs) in a fresh `python -m qlora_ops.tasks.core.child`, tied to this
    process (popen_child: it dies with us, and is ended when this call is interrupted). Returns its JSON result
    (Paths come back as Paths). stderr (progress bars, warnings) goes through to ours as it comes. In this
    process instead when $QLORA_STAGES_IN_PROCESS is "1", unless `force_child` (a CUDA context must not
    outlive the stage)."""
    if in_process() and not force_child:
        mod, fn = target.split(":")
        return getattr(importlib.import_module(mod), fn)(params, *args, **kwargs)
    what = target.rsplit(":", 1)[-1]
    with tempfile.TemporaryDirectory(prefix="qlora-ops-child-") as tmp:
        pfile, cfile = Path(tmp) / "params.json", Path(tmp) / "call.json"
        atomic_write_json(pfile, params.model_dump(mode="json"))  # JSON is YAML: load_params validates it
        atomic_write_json(cfile, {"target": target, "args": _enc(list(args)), "kwargs": _enc(kwargs)})
        proc = popen_child([sys.executable, "-m", "qlora_ops.tasks.core.child", str(pfile), str(cfile)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        tail: collections.deque[str] = collections.deque(maxlen=40)

        def relay() -> None:
            for line in proc.stderr:
                tail.append(line)
                sys.stderr.write(line)
            sys.stderr.flush()

        t = threading.Thread(target=relay, name=f"child-stderr-{what}", daemon=True)
        t.start()
        result = None
        try:
            for line in proc.stdout:
                if line.startswith(RESULT_MARK):
                    result = json.loads(line[len(RESULT_MARK):])
                elif line.strip():
                    print(line.rstrip("\n"), flush=True)
            rc = proc.wait()
        finally:
            end_child(proc)  # cancelled or timed out here: the child must not outlive its stage
            t.join(timeout=5)
    if result is not None and result.get("process_peak_bytes"):
        note_child_peak(int(result["process_peak_bytes"]))
    if rc == 0 and result is not None and "result" in result:
        return _dec(result["result"])
    raise _rebuild(result or {"error": None, "message": f"exit code {rc}"}, what, "".join(tail)[-2000:])


def main(argv: list[str] | None = None) -> int:
    """`python -m qlora_ops.tasks.core.child PARAMS_FILE CALL_FILE`: what call_in_child starts."""
    a = sys.argv[1:] if argv is None else argv
    die_with_parent_if_tied()
    configure()  # as quiet (or verbose) as the caller: its choice travels in the environment
    call = json.loads(Path(a[1]).read_text())
    mod, fn = call["target"].split(":")
    try:
        params = load_params(a[0])
        out = getattr(importlib.import_module(mod), fn)(params, *_dec(call["args"]), **_dec(call["kwargs"]))
        rec, rc = {"result": _enc(out)}, 0
    except Exception as e:  # noqa: BLE001 - every failure goes back to the caller with its class
        if is_debug():  # the caller says the error in one paragraph; the child's traceback only with --debug
            import traceback

            traceback.print_exc()
        rec, rc = {"error": type(e).__name__, "module": type(e).__module__, "message": str(e)}, 1
    rec["process_peak_bytes"] = process_peak_bytes()
    print(RESULT_MARK + json.dumps(rec, default=str), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
