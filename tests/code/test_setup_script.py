""".ci/setup.sh's two paths, run for real in a copy of the repository with recording stand-ins for
`apt-get` and `id` first on PATH: the run path never asks for root or system packages; the test path
installs the missing ones with apt-get as root and, without root, says once what it skips and goes on.
The installing part itself is exercised from a fresh clone (README "The two commands": measured there);
here it stops at the Python check (PYTHON names an interpreter that is not 3.11), before any install."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.fixture
def repo(tmp_path) -> Path:
    r = tmp_path / "repo"
    (r / ".ci").mkdir(parents=True)
    shutil.copy2(ROOT / ".ci/setup.sh", r / ".ci/setup.sh")
    shutil.copytree(ROOT / "locks", r / "locks")
    shutil.copy2(ROOT / "pyproject.toml", r / "pyproject.toml")
    return r


def setup(repo: Path, *args: str, uid: int) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run setup.sh with PATH = stand-ins + the real tools minus chromium (so the test path wants it)."""
    bin_ = repo.parent / "bin"
    bin_.mkdir(exist_ok=True)
    calls = repo.parent / "calls.txt"
    (bin_ / "apt-get").write_text(f'#!/bin/sh\necho "apt-get $*" >> {calls}\n')
    (bin_ / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    (bin_ / "python-not-311").write_text("#!/bin/sh\nexit 1\n")  # fails the 3.11 check: nothing gets installed
    for f in bin_.iterdir():
        f.chmod(0o755)
    tools = repo.parent / "tools"
    tools.mkdir(exist_ok=True)
    for t in ("bash", "sh", "awk", "sed", "cat", "cut", "sha256sum", "mktemp", "rm", "uname", "dirname", "grep"):
        if not (tools / t).exists():
            (tools / t).symlink_to(shutil.which(t))
    env = {"PATH": f"{bin_}:{tools}", "PYTHON": str(bin_ / "python-not-311"), "HOME": str(repo.parent)}
    r = subprocess.run(["bash", ".ci/setup.sh", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    return r, calls.read_text().splitlines() if calls.is_file() else []


def test_the_run_path_needs_no_root_and_no_system_packages(repo):
    r, calls = setup(repo, uid=1000)
    assert calls == [] and "system packages" not in r.stderr
    assert r.returncode == 1 and "the lock is for CPython 3.11" in r.stderr  # got as far as installing


def test_the_test_path_installs_system_packages_as_root_and_skips_them_with_one_note_otherwise(repo):
    r, calls = setup(repo, "--test", uid=0)
    assert any(c.startswith("apt-get install") and "chromium" in c for c in calls), calls
    (repo.parent / "calls.txt").unlink()
    r, calls = setup(repo, "--test", uid=1000)
    assert calls == []
    notes = [line for line in r.stderr.splitlines() if "skipping system packages" in line]
    assert len(notes) == 1 and "chromium" in notes[0], r.stderr
    assert "the lock is for CPython 3.11" in r.stderr  # and it went on


def test_an_unchanged_install_is_a_no_op(repo, tmp_path):
    # The stamp the last install wrote matches: nothing is looked at again, not even Python.
    env = {**os.environ, "PYTHON": "/nonexistent"}
    (repo / ".venv").mkdir()
    r = subprocess.run(["bash", "-c", "cat locks/linux-x86_64-cpu*.txt locks/no-deps.txt pyproject.toml .ci/setup.sh "
                        "| sha256sum | cut -c1-16"], cwd=repo, capture_output=True, text=True, check=True)
    (repo / ".venv/.qlora-ops-installed").write_text(f"test {r.stdout.strip()}\n")
    for args in ((), ("--test",)):
        assert subprocess.run(["bash", ".ci/setup.sh", *args], cwd=repo, env=env).returncode == 0
    (repo / "pyproject.toml").write_text((repo / "pyproject.toml").read_text() + "\n")  # an edit: install again
    r = subprocess.run(["bash", ".ci/setup.sh"], cwd=repo, env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "CPython 3.11" in r.stderr
