"""Serve a registered version with MLflow's scoring server, and prove that a live endpoint answers
exactly as the version was evaluated (the serving parity gate).

    qlora-ops serve --alias champion --port 5001          # mlflow models serve, on 127.0.0.1, digest checked
    qlora-ops verify-serving http://127.0.0.1:5001 --version 7

`serve` downloads the version, checks what MLflow will run (MLmodel: the loader is the installed module
tasks.registry.loader, no code, no pickle) and every byte against the version's `weights_digest` tag, then serves
THAT local copy (what was checked is what is served; the scoring server's loader checks again, with the
digest handed over in QLORA_OPS_WEIGHTS_DIGEST).

`verify-serving` replays the version's test rows (its MLflow run's data/prepared/test.jsonl, in the rows
and order of eval/merged/predictions.jsonl) through the endpoint, as a client would (the prompt only;
a row's own system prompt only where it is not the run's data.system_prompt), and compares the answers
with the evaluated ones: the share of rows whose answer differs (Clopper-Pearson interval) and the gate
metric on the served answers. The result goes on the version as `serving_*` tags and on its run as
serving/parity.json; only a check within gates.max_serving_disagreement moves the `serving` alias.
A qlora-ops endpoint also describes itself (param `describe`), so a difference is named: other weights,
another dtype, another system prompt, another token budget or batch size.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SERVING_ALIAS = "serving"
PARITY_FILE = "serving/parity.json"
CHECK_TAGS = ("serving_check", "serving_disagreement", "serving_disagreement_ci", "serving_metric",
              "serving_checked", "serving_check_detail")


class ServingError(RuntimeError):
    """A version that cannot be served or checked (no digest, a foreign MLmodel, missing eval files)."""


class EndpointUnavailable(ServingError):
    """The endpoint did not answer (or answered with an error)."""


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


def _version_tags(model_name: str, version: int) -> dict[str, str]:
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

    from qlora_ops.tasks.registry.register import LOADER_MODULE

    meta = yaml.safe_load((Path(model_dir) / "MLmodel").read_text()) or {}
    flavors = meta.get("flavors") or {}
    pf = flavors.get("python_function") or {}
    bad = []
    if set(flavors) != {"python_function"}:
        bad.append(f"flavors {sorted(flavors)}")
    if pf.get("loader_module") != LOADER_MODULE:
        bad.append(f"loader_module {pf.get('loader_module')!r}")
    if pf.get("code") or pf.get("python_model") or pf.get("cloudpickle_version"):
        bad.append("code or a pickled model in the artifact")
    if bad:
        raise ServingError(f"{model_dir}/MLmodel: {', '.join(bad)}; only models logged by qlora-ops (loader "
                           f"{LOADER_MODULE}, data only) are served: loading this one could run code from the "
                           "artifact store")
    return Path(model_dir) / str(pf.get("data") or "data/model")


def fetch_model(model_name: str, version: int, dst: Path) -> tuple[Path, str]:
    """(local logged-model dir, weights digest) of a version: downloaded, MLmodel and every byte checked."""
    import shutil

    import mlflow

    from qlora_ops.tasks.registry.register import WEIGHTS_DIGEST
    from qlora_ops.tasks.registry.loader import WeightsRefused, check_weights

    digest = _version_tags(model_name, version).get(WEIGHTS_DIGEST)
    if not digest:
        raise ServingError(f"{model_name} v{version} has no {WEIGHTS_DIGEST} tag (registered before qlora-ops "
                           "recorded digests): there is nothing to check its bytes against; register it again")
    shutil.rmtree(dst, ignore_errors=True)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_name}/{version}", dst_path=str(dst)))
    try:
        check_weights(check_mlmodel(local), digest)
    except WeightsRefused as e:
        raise ServingError(f"{model_name} v{version}: {e}") from None
    return local, digest


# ---------------------------------------------------------------- MLflow's scoring server

def server_command(model_dir: Path, host: str, port: int, workers: int = 1) -> list[str]:
    """`mlflow models serve` of the venv running us (its bin dir also goes first on PATH)."""
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    return [str(mlflow_cli), "models", "serve", "-m", str(model_dir), "--env-manager", "local",
            "-h", host, "-p", str(port), "-w", str(workers)]


def server_env(digest: str, dtype: str | None = None) -> dict[str, str]:
    from qlora_ops.tasks.registry.loader import DIGEST_ENV, DTYPE_ENV

    env = dict(os.environ)
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
    from qlora_ops.tasks.core.util import popen_child

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
# checks such an endpoint like any other: its answers against the evaluated ones.

def fetch_gguf(model_name: str, version: int, kind: str, dst: Path) -> Path:
    """The version's exported GGUF (`export-gguf`), downloaded and checked against its recorded sha256."""
    import mlflow

    from qlora_ops.tasks.core.util import sha256_file

    tags = _version_tags(model_name, version)
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


def is_openai(url: str, timeout: float = 10) -> str | None:
    """The model id an OpenAI-compatible endpoint serves (GET /v1/models), or None."""
    try:
        with urllib.request.urlopen(f"{http_url(url)}/v1/models", timeout=timeout) as r:
            return str(json.loads(r.read())["data"][0]["id"])
    except (OSError, ValueError, KeyError, IndexError, TypeError, ServingError):
        return None


def ask_openai(url: str, rows: list[dict], system: str | None, max_new_tokens: int, timeout: float = 600) -> list[str]:
    """Answers of /v1/chat/completions, greedy (temperature 0, top_k 1, no repeat penalty: llama.cpp's server
    applies 1.1 unless told), the system turn always sent as tasks.model.prompting renders it."""
    out = []
    for r in rows:
        msgs = [{"role": "system", "content": r.get("system") or system or ""}, {"role": "user", "content": r["prompt"]}]
        body = {"messages": msgs, "temperature": 0.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0,
                "max_tokens": int(max_new_tokens), "seed": 0}
        res = _post(f"{url.rstrip('/')}/v1/chat/completions", body, timeout)
        try:
            out.append(str(res["choices"][0]["message"]["content"] or "").strip())
        except (KeyError, IndexError, TypeError):
            raise EndpointUnavailable(f"{url}/v1/chat/completions returned {str(res)[:200]!r}") from None
    return out


# ---------------------------------------------------------------- what was evaluated

def evaluated(model_name: str, version: int, dst: Path) -> dict:
    """The version's test rows, evaluated answers and evaluation settings, from its MLflow run."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from qlora_ops.tasks.registry.register import WEIGHTS_DIGEST
    from qlora_ops.tasks.core.util import read_json, read_jsonl

    tags = _version_tags(model_name, version)
    run_id = tags.get("mlflow_run_id")
    if not run_id:
        raise ServingError(f"{model_name} v{version} has no mlflow_run_id tag: no evaluation to compare with")
    dst.mkdir(parents=True, exist_ok=True)

    def get(path: str) -> Path:
        try:
            return Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/{path}", dst_path=str(dst)))
        except Exception as e:
            raise ServingError(f"{model_name} v{version}: run {run_id} has no {path} ({type(e).__name__}); "
                               "its test rows or evaluated answers are missing") from None

    preds = read_jsonl(get("eval/merged/predictions.jsonl"))
    metrics = read_json(get("eval/merged/metrics.json"))
    test = {r["id"]: r for r in read_jsonl(get("data/prepared/test.jsonl"))}
    if missing := [p["id"] for p in preds if p["id"] not in test]:
        raise ServingError(f"run {run_id}: rows {missing[:3]} of eval/merged are not in data/prepared/test.jsonl")
    params = MlflowClient().get_run(run_id).data.params
    root = MlflowClient().get_model_version_download_uri(model_name, str(version)).rstrip("/")
    cfg = read_json(mlflow.artifacts.download_artifacts(f"{root}/data/model/config.json", dst_path=str(dst / "config")))
    metric = metrics.get("metric") or params.get("eval.metric") or "exact_match"
    return {"run_id": run_id, "rows": [test[p["id"]] for p in preds], "ids": [p["id"] for p in preds],
            "answers": [p["prediction"] for p in preds], "references": [p["reference"] for p in preds],
            "metric": metric, "metrics": {"exact_match": metrics.get("accuracy"), **(metrics.get("metrics") or {})},
            "system_prompt": params.get("data.system_prompt"), "batch_size": int(params.get("eval.batch_size") or 16),
            "max_new_tokens": metrics.get("max_new_tokens"), "weights_digest": tags.get(WEIGHTS_DIGEST),
            "dtype": str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").replace("torch.", "")}


def metric_scores(name: str, predictions: list[str], references: list[str]) -> tuple[str, list[float]]:
    """(metric, per-row scores) of answers with the gate metric (tasks.metrics, design contract A). A
    likelihood metric (nll) scores the reference under the model, not an answer: exact match is used then."""
    from qlora_ops.tasks import metrics as M

    if M.get(name).kind != "generation":
        name = "exact_match"
    return name, [float(x) for x in M.score(name, predictions, references)]


# ---------------------------------------------------------------- the live endpoint

def http_url(url: str) -> str:
    """`url` if it is http(s)://host...; else ServingError (urllib would also open file:// and the like)."""
    from urllib.parse import urlsplit

    p = urlsplit(url)
    if p.scheme not in ("http", "https") or not p.hostname:
        raise ServingError(f"endpoint URL {url!r}: expected http(s)://host[:port]")
    return url.rstrip("/")


def _post(url: str, body: dict, timeout: float) -> dict:
    url = http_url(url)
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise EndpointUnavailable(f"{url} answered {e.code}: {e.read()[:500].decode(errors='replace')}") from None
    except (OSError, ValueError) as e:
        raise EndpointUnavailable(f"{url} did not answer ({type(e).__name__}: {e})") from None


def ask(url: str, records: list[dict], batch_size: int, timeout: float = 600) -> list[str]:
    """Answers of a scoring-server endpoint to `records` ({"prompt"[, "system"]}), one request per batch
    of the evaluation's batch size (the served model decodes each request in those same batches)."""
    out: list[str] = []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        res = _post(f"{url.rstrip('/')}/invocations", {"dataframe_records": chunk}, timeout).get("predictions")
        if not isinstance(res, list) or len(res) != len(chunk):
            raise EndpointUnavailable(f"{url}/invocations returned {str(res)[:200]!r} for {len(chunk)} rows")
        out += [str(a) for a in res]
    return out


def describe(url: str, timeout: float = 60) -> dict | None:
    """What a qlora-ops endpoint says decides its answers; None for an endpoint that does not say."""
    try:
        res = _post(f"{url.rstrip('/')}/invocations", {"dataframe_records": [{"prompt": ""}],
                                                       "params": {"describe": True}}, timeout)
        d = json.loads(res["predictions"][0])
        return d if isinstance(d, dict) and "weights_digest" in d else None
    except (EndpointUnavailable, KeyError, IndexError, TypeError, ValueError):
        return None


def causes(ev: dict, served: dict | None) -> list[str]:
    """Each way the endpoint differs from the evaluated setup, named."""
    if served is not None and served.get("api") == "openai":
        return [f"an OpenAI-compatible endpoint (model {served['model']}): if it runs the version's GGUF, llama.cpp's "
                "numerics (f16/q8_0 kernels, one row at a time) differ from the evaluated transformers model; "
                "export-gguf's parity shows by how much"]
    if served is None:
        return ["the endpoint does not describe itself (not a qlora-ops scoring server?): compare its model, "
                "dtype and system prompt by hand"]
    out = []
    if served.get("weights_digest") != ev["weights_digest"]:
        out.append(f"other weights: the endpoint's weights_digest is {str(served.get('weights_digest'))[:16]}..., "
                   f"this version's {str(ev['weights_digest'])[:16]}...")
    if served.get("dtype") != ev["dtype"]:
        out.append(f"dtype: served in {served.get('dtype')}, evaluated in {ev['dtype']}")
    if ev["system_prompt"] is not None and \
            served.get("system_prompt_sha256") != hashlib.sha256(ev["system_prompt"].encode()).hexdigest():
        out.append("system prompt: the endpoint's default system prompt is not data.system_prompt of the "
                   f"evaluated run {ev['run_id']}")
    for k in ("max_new_tokens", "batch_size"):
        if ev.get(k) is not None and served.get(k) != ev[k]:
            out.append(f"{k}: served with {served.get(k)}, evaluated with {ev[k]}")
    return out


def check(url: str, model_name: str, version: int, threshold: float, confidence: float, work: Path) -> dict:
    """Replay the version's test rows through `url` and compare with its evaluated answers."""
    from qlora_ops.tasks.gates.stats import agreement

    url = http_url(url)
    ev = evaluated(model_name, version, work)
    t0 = time.time()
    if (openai_model := is_openai(url)) is not None:
        served_desc = {"api": "openai", "model": openai_model}
        served = ask_openai(url, ev["rows"], ev["system_prompt"], int(ev["max_new_tokens"] or 32))
    else:
        records = [{"prompt": r["prompt"]} if r.get("system") in (None, ev["system_prompt"]) else
                   {"prompt": r["prompt"], "system": r["system"]} for r in ev["rows"]]
        served_desc = describe(url)
        served = ask(url, records, ev["batch_size"])
    agr = agreement(ev["answers"], served, confidence=confidence)
    metric, scores = metric_scores(ev["metric"], served, ev["references"])
    differ = [i for i, (a, b) in enumerate(zip(ev["answers"], served)) if a != b]
    res = {"model_name": model_name, "version": int(version), "url": _redact(url), "run_id": ev["run_id"],
           "n": agr["n"], "differ": agr["differ"], "share": agr["share"], "ci_low": agr["ci_low"],
           "ci_high": agr["ci_high"], "confidence": confidence, "threshold": threshold,
           "passed": agr["share"] <= threshold, "metric": metric, "evaluated_metric": ev["metrics"].get(metric),
           "served_metric": sum(scores) / len(scores), "seconds": round(time.time() - t0, 1),
           "examples": [{"id": ev["ids"][i], "evaluated": ev["answers"][i], "served": served[i]} for i in differ[:5]],
           "causes": causes(ev, served_desc) if differ else [], "endpoint": served_desc,
           "checked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return res


def _redact(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    p = urlsplit(url)
    return urlunsplit(p._replace(netloc=p.hostname + (f":{p.port}" if p.port else ""))) if p.password else url


def _f(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "?"


def explain(res: dict) -> str:
    head = (f"serving parity of {res['model_name']} v{res['version']} at {res['url']}: {res['differ']}/{res['n']} "
            f"answers differ ({res['share']:.4f}, {res['confidence']:.0%} interval [{res['ci_low']:.4f}, "
            f"{res['ci_high']:.4f}]) {'<=' if res['passed'] else '>'} gates.max_serving_disagreement "
            f"{res['threshold']}: {'PASS' if res['passed'] else 'FAIL'}; {res['metric']} served "
            f"{res['served_metric']:.4f}, evaluated {_f(res['evaluated_metric'])}")
    lines = [head] + [f"  cause: {c}" for c in res["causes"]]
    lines += [f"  row {e['id']}: evaluated {e['evaluated']!r}, served {e['served']!r}" for e in res["examples"]]
    return "\n".join(lines)


def record(res: dict, alias: str = SERVING_ALIAS) -> dict:
    """The check's result as tags on the version (and serving/parity.json on its run); `alias` moves to
    the version only when the check passed. Returns res with "alias_moved"."""
    from mlflow.tracking import MlflowClient

    c, name, v = MlflowClient(), res["model_name"], str(res["version"])
    tags = {"serving_check": "passed" if res["passed"] else "failed",
            "serving_disagreement": f"{res['share']:.4f}",
            "serving_disagreement_ci": f"[{res['ci_low']:.4f}, {res['ci_high']:.4f}]",
            "serving_metric": f"{res['metric']}={res['served_metric']:.4f}",
            "serving_checked": f"{res['checked_at']} {res['url']}",
            "serving_check_detail": explain(res)[:5000]}
    for k, val in tags.items():
        c.set_model_version_tag(name, v, k, val)
    c.log_text(res["run_id"], json.dumps(res, indent=2, sort_keys=True, default=str), PARITY_FILE)
    moved = False
    if res["passed"]:
        c.set_registered_model_alias(name, alias, v)
        moved = int(c.get_model_version_by_alias(name, alias).version) == res["version"]
    return {**res, "alias": alias, "alias_moved": moved}


def verify_serving(url: str, model_name: str, version: int, threshold: float, confidence: float, work: Path,
                   alias: str = SERVING_ALIAS) -> dict:
    """check + record: what `qlora-ops verify-serving` and the webhook receiver run."""
    return record(check(url, model_name, version, threshold, confidence, work), alias)
