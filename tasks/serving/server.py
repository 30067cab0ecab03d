"""Serve a registered version: MLflow's scoring server on a checked local copy (or llama-cpp-python's
OpenAI-compatible server on its exported GGUF), started, awaited and stopped.

    qlora-ops serve --alias champion --port 5001          # mlflow models serve, on 127.0.0.1, digest checked

`serve` downloads the version, checks MLmodel's sha256 against the version's `mlmodel_digest` tag and what
MLflow will run (MLmodel: the loader is the installed module tasks.registry.loader, no code, no pickle) and
every byte against the version's `weights_digest` tag (tags only the registrar writes), then serves
THAT local copy (what was checked is what is served; the scoring server's loader checks again, with the
digest handed over in QLORA_OPS_WEIGHTS_DIGEST). Whether a live endpoint answers as the version was
evaluated is tasks/serving/parity.py; talking to one is tasks/serving/client.py.
"""
from __future__ import annotations

import os
import re
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qlora_ops.tasks.core.util import popen_child, sha256_file
from qlora_ops.tasks.registry.legacy import LEGACY_LOADER_MODULE, LOADER_MODULE
from qlora_ops.tasks.registry.loader import DIGEST_ENV, DTYPE_ENV, WeightsRefused, check_weights

SERVING_ALIAS = "serving"  # moved by a passed parity check (tasks.serving.parity); what `serve --follow` serves


class ServingError(RuntimeError):
    """A version that cannot be served or checked (no digest, a foreign MLmodel, missing eval files)."""


# ---------------------------------------------------------------- the registered version

def resolve_version(model_name: str, version: int | None = None, alias: str | None = None) -> int:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if version is not None:
        return int(version)
    try:
        return int(MlflowClient().get_model_version_by_alias(model_name, alias or "champion").version)
    except MlflowException as e:
        raise ServingError(f"{model_name} has no version with alias '{alias or 'champion'}' ({e.message[:200]})") from None


def version_tags(model_name: str, version: int) -> dict[str, str]:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return dict(MlflowClient().get_model_version(model_name, str(version)).tags or {})
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ServingError(f"{model_name} has no version {version} (qlora-ops status lists them)") from None


def check_mlmodel(model_dir: Path) -> Path:
    """The data dir of a logged model, after checking that loading it runs only the installed loader
    (tasks.registry.loader): one pyfunc flavor, no code paths, no pickled python_model. Raises ServingError."""
    import yaml

    meta = yaml.safe_load((Path(model_dir) / "MLmodel").read_text()) or {}
    flavors = meta.get("flavors") or {}
    pf = flavors.get("python_function") or {}
    bad = []
    if set(flavors) != {"python_function"}:
        bad.append(f"flavors {sorted(flavors)}")
    if pf.get("loader_module") not in (LOADER_MODULE, LEGACY_LOADER_MODULE):
        bad.append(f"loader_module {pf.get('loader_module')!r}")
    if pf.get("code") or pf.get("python_model") or pf.get("cloudpickle_version"):
        bad.append("code or a pickled model in the artifact")
    if bad:
        raise ServingError(f"{model_dir}/MLmodel: {', '.join(bad)}; only models logged by qlora-ops (loader "
                           f"{LOADER_MODULE}, data only) are served: loading this one could run code from the "
                           "artifact store")
    if pf["loader_module"] == LEGACY_LOADER_MODULE:
        # Registered before the stage packages: this local copy (ours, downloaded to serve) names the loader by
        # its new name, so `mlflow models serve` loads it without the old top-level name (registry/legacy.py).
        pf["loader_module"] = LOADER_MODULE
        (Path(model_dir) / "MLmodel").write_text(yaml.safe_dump(meta, sort_keys=False))
    return Path(model_dir) / str(pf.get("data") or "data/model")


def fetch_model(model_name: str, version: int, dst: Path, allow_unverified_legacy: bool = False) -> tuple[Path, str]:
    """(local logged-model dir, weights digest) of a version: downloaded, then checked against the version's
    registry tags, which only the registrar writes (never against what came with the bytes): MLmodel's
    sha256 against `mlmodel_digest`, then what it runs (the installed loader, no code), then every byte
    against the manifest and the manifest against `weights_digest`. A version registered before
    `mlmodel_digest` existed gets the structural MLmodel check only; one without `weights_digest` is refused
    unless `allow_unverified_legacy` (then only checked against its own manifest)."""
    import shutil

    import mlflow

    # registry.register imports mlflow at its top: importing this module stays cheap for those that only
    # start or stop a server (the tests' stop_process_group, `qlora-ops status` for SERVING_ALIAS)
    from qlora_ops.tasks.registry.register import MLMODEL_DIGEST, WEIGHTS_DIGEST

    tags = version_tags(model_name, version)
    digest = tags.get(WEIGHTS_DIGEST)
    if not digest and not allow_unverified_legacy:
        raise ServingError(f"{model_name} v{version} has no {WEIGHTS_DIGEST} tag (registered before qlora-ops "
                           "recorded digests): there is nothing to check its bytes against; register it again "
                           "(or, knowingly, allow_unverified_legacy=True / --allow-unverified-legacy)")
    shutil.rmtree(dst, ignore_errors=True)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_name}/{version}", dst_path=str(dst)))
    if (pinned := tags.get(MLMODEL_DIGEST)) and (got := sha256_file(local / "MLmodel")) != pinned:
        raise ServingError(f"{model_name} v{version}: MLmodel sha256 {got[:16]}... is not the registered "
                           f"{MLMODEL_DIGEST} {pinned[:16]}...; the artifact was changed after registration, "
                           "refusing to load")
    try:
        got = check_weights(check_mlmodel(local), digest or None)
    except WeightsRefused as e:
        raise ServingError(f"{model_name} v{version}: {e}") from None
    return local, digest or got


def load_version(name: str, version: int, dst: Path | None = None, *, allow_unverified_legacy: bool = False):
    """`mlflow.pyfunc` model of registered version `version` of `name`, loaded from a local copy checked
    against the version's registry tags (fetch_model: MLmodel against `mlmodel_digest`, every byte against
    `weights_digest`); the loader checks the bytes again against that digest. `dst`: where the copy goes
    (default: a new temporary dir, left in place). ServingError when anything does not match.

        from qlora_ops.tasks.serving import load_version
        model = load_version("qlora-ops-smollm2", 3)
    """
    import tempfile

    import mlflow
    import yaml

    dst = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix=f"qlora-ops-{name}-v{version}-"))
    local, digest = fetch_model(name, int(version), dst, allow_unverified_legacy=allow_unverified_legacy)
    # Our checked copy: the digest MLmodel logged (it came with the bytes) is dropped, so the one handed to
    # the loader is the only expectation it sees (tasks.registry.loader._load_pyfunc).
    meta = yaml.safe_load((local / "MLmodel").read_text()) or {}
    cfg = (meta.get("flavors") or {}).get("python_function", {}).get("config")  # MLmodel's model_config
    if isinstance(cfg, dict) and cfg.get("weights_digest"):
        cfg["weights_digest"] = ""
        (local / "MLmodel").write_text(yaml.safe_dump(meta, sort_keys=False))
    return mlflow.pyfunc.load_model(str(local), model_config={"weights_digest": digest})


# ---------------------------------------------------------------- MLflow's scoring server

def server_command(model_dir: Path, host: str, port: int, workers: int = 1) -> list[str]:
    """`mlflow models serve` of the venv running us (its bin dir also goes first on PATH)."""
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    return [str(mlflow_cli), "models", "serve", "-m", str(model_dir), "--env-manager", "local",
            "-h", host, "-p", str(port), "-w", str(workers)]


# What a scoring server never gets: it serves a local copy whose bytes were checked, so it needs no MLflow,
# Prefect or S3 access; a request that exploits the model server must not find a login in its environment.
_CREDENTIAL_ENV = re.compile(r"^MLFLOW_TRACKING_|^PREFECT_API_(KEY|AUTH_STRING)$|^AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)$"
                             r"|(^|_)(PASSWORD|SECRET|TOKEN|API_KEY|ACCESS_KEY|AUTH_STRING|CREDENTIALS?)($|_)", re.I)


def server_env(digest: str, dtype: str | None = None) -> dict[str, str]:
    """The scoring server's environment: ours without any credential (_CREDENTIAL_ENV), plus the weights'
    digest and dtype it must report."""
    env = {k: v for k, v in os.environ.items() if not _CREDENTIAL_ENV.search(k)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env[DIGEST_ENV] = digest
    env.pop(DTYPE_ENV, None)
    if dtype:
        env[DTYPE_ENV] = dtype
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def wait_ready(url: str, proc, timeout: float, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise ServingError(f"the scoring server exited ({proc.returncode}) before answering {url}/ping"
                               + (f":\n{_tail(log)}" if log else ""))
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise ServingError(f"the scoring server at {url} did not answer /ping within {timeout:g} s")


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@contextmanager
def scoring_server(model_dir: Path, digest: str, port: int, host: str = "127.0.0.1", dtype: str | None = None,
                   log: Path | None = None, timeout: float = 300) -> Iterator[str]:
    """A scoring server of the checked local `model_dir` for the length of the block; yields its URL."""
    log = log or Path(model_dir).parent / f"scoring-server-{port}.log"
    with open(log, "w") as fh:
        proc = popen_child(server_command(model_dir, host, port), env=server_env(digest, dtype),
                           stdout=fh, stderr=fh, start_new_session=True)
    url = f"http://{host}:{port}"
    try:
        wait_ready(url, proc, timeout, log)
        yield url
    finally:
        stop(proc)


def stop(proc) -> None:
    import signal
    import subprocess

    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the CLI and the uvicorn workers it started
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------- the OpenAI-compatible endpoint (GGUF)
# /v1/chat/completions without a server of ours: llama-cpp-python's own server (the `gguf` extra) on the
# version's exported GGUF. Chosen over vLLM (needs a GPU; CPU builds are not on PyPI) and over MLflow's
# scoring server (its chat schema is served at /invocations, not /v1/chat/completions). verify-serving
# checks such an endpoint like any other: its answers against the evaluated ones (tasks.serving.client
# asks it, tasks.serving.client.is_openai tells when it is up).

def fetch_gguf(model_name: str, version: int, kind: str, dst: Path) -> Path:
    """The version's exported GGUF (`export-gguf`), downloaded and checked against its recorded sha256."""
    import mlflow

    tags = version_tags(model_name, version)
    if not (uri := tags.get(f"gguf_{kind}")):
        raise ServingError(f"{model_name} v{version} has no {kind} GGUF: run qlora-ops export-gguf --version {version}")
    digests = dict(x.split("=", 1) for x in tags.get("gguf_digests", "").split())
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(dst)))
    if sha256_file(local) != digests.get(local.name):
        raise ServingError(f"{local}: sha256 is not the one recorded by export-gguf (tag gguf_digests); refusing to serve")
    return local


def openai_server_command(gguf: Path, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", host, "--port", str(port),
            "--n_ctx", "4096", "--seed", "0"]
