"""The dependency lock (locks/, tasks/core/lockfile.py): this environment is the locked one, the platform locks
agree with each other and with pyproject.toml, the lock's hash moves with any lock file, and every MLflow
run records the hash and the versions of the libraries that decide the model."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from qlora_ops.tasks.core import lockfile
from tests.conftest import ROOT


def test_installed_versions_equal_the_lock():
    # Every package the lock pins for this platform (the test lock: tests run after `.ci/setup.sh --test`),
    # at exactly the locked version.
    name = lockfile.platform_lock(test=True)
    path = ROOT / "locks" / f"{name}.txt"
    if not path.is_file():  # a GPU machine: its lock has no test variant
        path = ROOT / "locks" / f"{lockfile.platform_lock()}.txt"
    assert len(lockfile.pins(path)) > 200
    assert lockfile.installed_mismatches(path) == [], "run `bash .ci/setup.sh --test`"


def test_the_locks_agree_with_each_other_and_with_pyproject():
    assert lockfile.check() == []
    cpu, cuda = (lockfile.pins(ROOT / "locks" / f"linux-x86_64-{k}.txt") for k in ("cpu", "cuda"))
    assert cpu["torch"][0].endswith("+cpu") and cuda["torch"][0] == cpu["torch"][0].removesuffix("+cpu")
    assert any(n.startswith("nvidia-") for n in cuda) and not any(n.startswith("nvidia-") for n in cpu)
    # The run needs no test tools and no heavy optional feature: the run lock has none of them.
    assert not {"pytest", "hypothesis", "moto", "prefect-kubernetes", "bandit", "lm-eval", "llama-cpp-python"} & set(cpu)


def test_the_images_install_the_lock():
    import re

    import yaml

    docker = (ROOT / "infra/Dockerfile").read_text()
    services = yaml.safe_load((ROOT / "infra/docker-compose.yml").read_text())["services"]
    cpu = re.search(r"^ARG LOCK=(\S+)", docker, re.M)[1]
    gpu = services["gpu-worker"]["build"]["args"]["LOCK"]
    assert (cpu, gpu) == ("linux-x86_64-cpu", "linux-x86_64-cuda") and "args" not in services["worker"]["build"]
    assert all((ROOT / "locks" / f"{n}.txt").is_file() for n in (cpu, gpu))
    installs = re.findall(r"pip install ([^\n&]*)", docker)
    assert len(installs) == 3 and all("--require-hashes" in i or i.strip().endswith("-e .") for i in installs), installs


@pytest.fixture
def copy(tmp_path) -> Path:
    shutil.copytree(ROOT / "locks", tmp_path / "locks")
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_check_names_a_lock_older_than_pyproject_and_platforms_that_drift(copy):
    _edit(copy / "pyproject.toml", '"pyyaml>=6,<7",', '"pyyaml>=6,<7",\n  "not-locked-yet>=1",')
    _edit(copy / "pyproject.toml", '"transformers>=5.0,<6"', '"transformers>=99"')
    cpu = lockfile.pins(copy / "locks/linux-x86_64-cpu.txt")
    _edit(copy / "locks/linux-x86_64-cuda.txt", f"peft=={cpu['peft'][0]} ", "peft==0.0.1 ")
    bad = "\n".join(lockfile.check(copy))
    assert "requires not-locked-yet>=1 but locks/linux-x86_64-cpu.txt has no not-locked-yet: run `bash .ci/lock.sh`" in bad
    assert f"requires transformers>=99 but locks/linux-x86_64-cpu.txt pins {cpu['transformers'][0]}" in bad
    assert f"locks/linux-x86_64-cuda.txt pins peft==0.0.1, the test lock {cpu['peft'][0]}" in bad


def test_installed_mismatches_name_package_and_both_versions(tmp_path):
    import importlib.metadata

    have = importlib.metadata.version("pyyaml")
    (tmp_path / "l.txt").write_text(f"pyyaml=={have} \\\n    --hash=sha256:00\nnumpy==0.0.1 \\\n    --hash=sha256:00\n"
                                    "not-installed-anywhere==1.0\nwin-only==1.0 ; sys_platform == 'win32'\n")
    assert lockfile.installed_mismatches(tmp_path / "l.txt") == [
        "not-installed-anywhere: locked 1.0, not installed",
        f"numpy: locked 0.0.1, installed {importlib.metadata.version('numpy')}"]


def test_lock_hash_moves_with_any_lock_file(copy):
    before = lockfile.lock_hash(copy)
    assert before == lockfile.lock_hash(copy) and len(before) == 16
    _edit(copy / "locks/macos-arm64.txt", "# via", "#  via")
    assert lockfile.lock_hash(copy) != before
    assert lockfile.lock_hash(copy / "nowhere") is None  # an installed wheel: no lock to hash


def test_run_tags_hold_the_lock_hash_and_the_decisive_versions():
    import importlib.metadata

    tags = lockfile.run_tags()
    assert tags["qlora_ops.lock_hash"] == lockfile.lock_hash() and tags["qlora_ops.lock"] == "linux-x86_64-cpu"
    for lib in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        assert tags[f"qlora_ops.lib.{lib}"] == importlib.metadata.version(lib)




def test_every_mlflow_run_is_tagged_with_the_lock_and_library_versions(tracking, tmp_path):
    import uuid

    from mlflow.tracking import MlflowClient

    from qlora_ops.tasks.registry import tracking as tr
    from qlora_ops.tasks.core.config import Params

    exp = tr.ensure_experiment(f"lock-{uuid.uuid4().hex[:8]}", (tmp_path / "a").as_uri(), remote=True)
    run_id = tr.start_run(Params(), exp, tags={"qlora_ops.fingerprint": "fp"}, run_name="tags")
    tags = MlflowClient().get_run(run_id).data.tags
    assert tags["qlora_ops.fingerprint"] == "fp"
    assert {k: tags[k] for k in lockfile.run_tags()} == lockfile.run_tags()
    assert tags["qlora_ops.lib.torch"].startswith("2.") and tags["qlora_ops.lock_hash"] != "none"
