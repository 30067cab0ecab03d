"""Children die with the process that started them (tasks.core.util.popen_child: PR_SET_PDEATHSIG), and one
run per workspace (flows.runtime.workspace_run_lock): real processes, real signals, real flocks."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from qlora_ops.flows.runtime import WorkspaceBusy, workspace_run_lock
from tests.conftest import ROOT

PARENT = textwrap.dedent("""
    import sys, time
    from qlora_ops.tasks.core.util import popen_child
    child = popen_child([sys.executable, "-c", "import time; time.sleep(120)"])
    print(child.pid, flush=True)
    time.sleep(120)
""")


def _gone(pid: int, timeout: float = 5) -> bool:
    try:
        p = psutil.Process(pid)
        p.wait(timeout=timeout)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return p.status() == psutil.STATUS_ZOMBIE
    return True


def test_a_child_dies_when_its_parent_is_killed_9():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        assert psutil.pid_exists(child) and psutil.Process(child).ppid() == parent.pid
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert _gone(child), f"child {child} outlived its parent {parent.pid}"
    finally:
        if psutil.pid_exists(child):
            os.kill(child, signal.SIGKILL)


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from qlora_ops.flows.runtime import workspace_run_lock
    with workspace_run_lock(Path(sys.argv[1]), 1):
        print("locked", flush=True)
        time.sleep(120)
""")


def test_second_run_waits_names_the_holder_then_refuses_and_a_killed_holder_frees_it(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t = time.monotonic()
        with pytest.raises(WorkspaceBusy, match=rf"another qlora-ops run \(pid {holder.pid}\) .*waited 1 s"):
            with workspace_run_lock(tmp_path, 1.0, poll_s=0.05):
                pass
        assert 1.0 <= time.monotonic() - t < 5
        said = capsys.readouterr().out.splitlines()
        assert said == [f"waiting for run pid {holder.pid} (it holds {tmp_path / '.qlora-ops' / 'run.lock'}; up to 1 s)"]
        os.kill(holder.pid, signal.SIGKILL)  # the kernel drops a dead holder's flock
        holder.wait()
        with workspace_run_lock(tmp_path, 5.0):
            assert (tmp_path / ".qlora-ops" / "run.lock").read_text().startswith(f"{os.getpid()} ")
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


CHAIN = textwrap.dedent("""
    import os, subprocess, sys, time
    from qlora_ops.tasks.core.util import TIE_ENV, popen_child
    os.environ[TIE_ENV] = sys.argv[1]
    # like the CLI -> dvc -> `python -m qlora_ops.tasks.data`: the middle one is not ours, the last one is
    grand = ("from tasks.core.util import die_with_parent_if_tied; die_with_parent_if_tied(); import sys, time; "
             "open(sys.argv[1], 'w').close(); time.sleep(120)")
    mid = popen_child([sys.executable, "-c", f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {grand!r}, {sys.argv[2]!r}]); print(p.pid, flush=True); time.sleep(120)"],
                      stdout=subprocess.PIPE, text=True)
    print(mid.pid, mid.stdout.readline().strip(), flush=True)
    time.sleep(120)
""")


@pytest.mark.parametrize("tied", ["1", "0"])
def test_our_entry_point_dies_with_a_middle_process_it_did_not_start(tied, tmp_path):
    armed = tmp_path / "armed"
    parent = subprocess.Popen([sys.executable, "-c", CHAIN, tied, str(armed)], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    mid, grand = map(int, parent.stdout.readline().split())
    try:
        deadline = time.time() + 30
        while not armed.exists():  # the grandchild has started (and, tied, set its PDEATHSIG)
            assert time.time() < deadline
            time.sleep(0.02)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert _gone(mid)
        # tied (what `qlora-ops run` sets): gone; untied (a user's own shell): left running, as they asked
        assert _gone(grand, timeout=5 if tied == "1" else 1) is (tied == "1")
    finally:
        for pid in (mid, grand):
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGKILL)
