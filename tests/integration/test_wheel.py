"""Install it like a tool: the wheel built by the project's own backend (`python -m build`), installed into a
new venv outside the clone, a workspace of your own made by it, `init` + `check` of a data file there and one
full `run` on the tests' tiny model, registered in that workspace's own MLflow store.

The new venv gets the locked wheels from uv's cache (and pip's find-links, where the CPU torch is), offline:
nothing is downloaded. Nothing here imports the checkout: the commands run with the venv's interpreter, in a
folder that is not the clone, without PYTHONPATH.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import start_prefect_server

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
PY = Path(sys.executable)  # the checkout's venv: it runs build and uv


def _find_links() -> list[str]:
    # As .ci/setup.sh: an offline wheelhouse in pip's find-links holds the CPU torch where uv's cache may not.
    conf = subprocess.run([str(PY), "-m", "pip", "config", "get", "global.find-links"], capture_output=True, text=True)
    dirs = (os.environ.get("PIP_FIND_LINKS", "") + " " + conf.stdout).split()
    return [a for d in dict.fromkeys(dirs) if Path(d).is_dir() for a in ("--find-links", d)]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("dist")
    t = time.monotonic()
    r = subprocess.run([str(PY), "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
                       capture_output=True, text=True, timeout=300)
    print(f"wheel built in {time.monotonic() - t:.1f} s")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return next(out.glob("qlora_ops-*.whl")), r.stdout + r.stderr


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tool") / "venv"
    uv = [str(PY), "-m", "uv"]
    subprocess.run([*uv, "venv", "-q", "--python", str(PY), str(d)], check=True, timeout=120)
    # uv itself is installed by pip (.ci/setup.sh), so it is in no cache: the lock's wheels without it
    no_deps = re.sub(r"(?ms)^uv==.*?(?=^\S|\Z)", "", (ROOT / "locks/no-deps.txt").read_text())
    (d.parent / "no-deps.txt").write_text(no_deps)
    t = time.monotonic()
    r = subprocess.run([*uv, "pip", "install", "--offline", "-q", "--python", str(d / "bin/python"), "--no-deps",
                        "--require-hashes", "-r", str(ROOT / "locks/linux-x86_64-cpu.txt"), "-r", str(d.parent / "no-deps.txt"),
                        *_find_links(), "--extra-index-url", "https://download.pytorch.org/whl/cpu"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # the wheel with its dependencies: its ranges must hold for the locked versions just installed
    r = subprocess.run([*uv, "pip", "install", "--offline", "--python", str(d / "bin/python"), str(wheel[0])],
                       capture_output=True, text=True, timeout=300)
    print(f"venv installed in {time.monotonic() - t:.1f} s")
    assert r.returncode == 0, r.stderr[-3000:]
    return d


def test_the_wheel_holds_one_namespace_and_what_a_run_needs(wheel):
    whl, log = wheel
    assert "project.license" not in log  # the SPDX string: no deprecation warning
    names = zipfile.ZipFile(whl).namelist()
    assert {n.split("/")[0] for n in names} == {"qlora_ops", whl.name.split("-py3")[0] + ".dist-info"}
    for need in ("qlora_ops/params/default.yaml", "qlora_ops/params/free-text.yaml", "qlora_ops/tasks/data/samples.py",
                 "qlora_ops/flows/retrain.py", "qlora_ops/tasks/registry/loader.py", "qlora_ops/tasks/registry/legacy.py",
                 "qlora_ops/tasks/metrics/rouge_l/rouge_l.py", "qlora_ops/infra/docker-compose.yml",
                 "qlora_ops/infra/prefect/work-pool.json", "qlora_ops/locks/linux-x86_64-cpu.txt"):
        assert need in names, need
    assert not [n for n in names if n.endswith("/.env")]
    meta = zipfile.ZipFile(whl).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Dist: torch==2.13.0" in meta and "License-Expression: Apache-2.0" in meta


def test_a_workspace_of_your_own_from_the_installed_wheel(venv, tiny_model_dir, tmp_path):
    exe = venv / "bin/qlora-ops"
    ws = tmp_path / "my-domain"
    with start_prefect_server(tmp_path / "prefect") as prefect:
        env = {k: v for k, v in prefect.client_env().items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.pop("MLFLOW_TRACKING_URI", None)

        def cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
            t = time.monotonic()
            r = subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
            print(f"qlora-ops {' '.join(args[:2])}: {time.monotonic() - t:.1f} s")
            assert r.returncode == 0, f"{args}: exit {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
            return r

        r = cli("workspace", "init", str(ws), cwd=tmp_path)
        assert (ws / "qlora-ops.yaml").is_file() and (ws / "dvc.yaml").is_file()
        (ws / "data/raw").mkdir(parents=True)
        subprocess.run([str(venv / "bin/python"), "-m", "qlora_ops.tasks.data", "sample", "--out", "data/raw/mine.jsonl"],
                       cwd=ws, env=env, check=True, capture_output=True)
        # from a folder inside the workspace: `init` writes into its params/, `check` and `run` find it
        sub = ws / "data/raw"
        cli("init", "mine.jsonl", "--model", str(tiny_model_dir), cwd=sub)
        p = yaml.safe_load((ws / "params/mine.yaml").read_text())
        p["model"]["max_seq_len"] = 96
        p["training"] = {"max_steps": 2, "batch_size": 8, "eval_every": 2, "save_every": 2, "threads": 1, "warmup_steps": 1}
        p["eval"] = {**p.get("eval", {}), "batch_size": 32, "max_new_tokens": 4, "max_examples": 16}
        p["gates"] = {**p.get("gates", {}), "min_gain_over_base": -1.0, "min_retention_vs_lora": 0.0,
                      "max_merge_disagreement": 1.0}
        (ws / "params/mine.yaml").write_text(yaml.safe_dump(p))
        r = cli("check", "--params", "params/mine.yaml", cwd=sub)
        assert "nothing was trained" in r.stdout and f"sqlite:///{ws}/.qlora-ops/mlflow.db" in r.stdout
        cli("run", "--params", "params/mine.yaml", cwd=sub, timeout=1500)  # ~2 min idle; 10+ on a loaded 2-core VM

    # the champion, in the workspace's own store; the run's qlora-ops version and lock hash, in the workspace
    from mlflow.tracking import MlflowClient

    from qlora_ops.tasks.core.lockfile import lock_hash

    champion = MlflowClient(f"sqlite:///{ws}/.qlora-ops/mlflow.db").get_model_version_by_alias("qlora-ops-mine", "champion")
    assert str(champion.version) == "1"
    rec = json.loads((ws / ".qlora-ops/versions.jsonl").read_text().splitlines()[-1])
    assert rec["qlora_ops"] == "0.1.0" and rec["lock_hash"] == lock_hash() and rec["outcome"] == "Completed"
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]["prepare-mine"]
    assert "qlora-ops.yaml" in {d["path"] for d in lock["deps"]}  # not the clone's tasks/ files
    assert not (ROOT / "params/mine.yaml").exists()
