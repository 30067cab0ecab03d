"""The serving parity gate: prove that a live endpoint answers exactly as a registered version was
evaluated, record the result, and move the `serving` alias only on a pass.

    qlora-ops verify-serving http://127.0.0.1:5001 --version 7

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

import contextlib
import hashlib
import json
import time
from pathlib import Path

from qlora_ops.tasks import metrics as M
from qlora_ops.tasks.core.secrets import redact_url
from qlora_ops.tasks.core.util import read_json, read_jsonl
from qlora_ops.tasks.serving.client import ask, ask_openai, describe, http_url, is_openai
from qlora_ops.tasks.serving.server import SERVING_ALIAS, ServingError, version_tags

PARITY_FILE = "serving/parity.json"
CHECK_TAGS = ("serving_check", "serving_disagreement", "serving_disagreement_ci", "serving_metric",
              "serving_checked", "serving_check_detail")


# ---------------------------------------------------------------- what was evaluated

def evaluated(model_name: str, version: int, dst: Path) -> dict:
    """The version's test rows, evaluated answers and evaluation settings, from its MLflow run."""
    import mlflow
    from mlflow.tracking import MlflowClient

    # registry.register imports mlflow at its top; this module stays cheap to import (tasks.serving.gguf
    # and so every serving command, `serve` included, import it)
    from qlora_ops.tasks.registry.register import WEIGHTS_DIGEST

    tags = version_tags(model_name, version)
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
    if M.get(name).kind != "generation":
        name = "exact_match"
    return name, [float(x) for x in M.score(name, predictions, references)]


# ---------------------------------------------------------------- the check

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


def other_model(ev: dict, served: dict | None) -> list[str]:
    """What the endpoint itself reports that makes it another model than the version: other weights, another
    dtype. Such an endpoint fails the check however close its answers (a few test rows cannot tell two
    fine-tunes apart). Only what it reports counts: an endpoint that does not describe itself is judged on
    its answers (and its causes listed)."""
    reported = served if served is not None and served.get("api") != "openai" else {}
    return [c for c in causes(ev, served) if (c.startswith("other weights") and reported.get("weights_digest"))
            or (c.startswith("dtype") and reported.get("dtype"))] if reported else []


def check(url: str, model_name: str, version: int, threshold: float, confidence: float, work: Path) -> dict:
    """Replay the version's test rows through `url` and compare with its evaluated answers."""
    from qlora_ops.tasks.gates.paired import agreement  # scipy and statsmodels: seconds, only when checking

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
    other = other_model(ev, served_desc)
    res = {"model_name": model_name, "version": int(version), "url": redact_url(url), "run_id": ev["run_id"],
           "n": agr["n"], "differ": agr["differ"], "share": agr["share"], "ci_low": agr["ci_low"],
           "ci_high": agr["ci_high"], "confidence": confidence, "threshold": threshold,
           "passed": agr["share"] <= threshold and not other, "other_model": other, "metric": metric, "evaluated_metric": ev["metrics"].get(metric),
           "served_metric": sum(scores) / len(scores), "seconds": round(time.time() - t0, 1),
           "examples": [{"id": ev["ids"][i], "evaluated": ev["answers"][i], "served": served[i]} for i in differ[:5]],
           "causes": causes(ev, served_desc) if differ or other else [], "endpoint": served_desc,
           "checked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return res


def _f(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "?"


def explain(res: dict) -> str:
    head = (f"serving parity of {res['model_name']} v{res['version']} at {res['url']}: {res['differ']}/{res['n']} "
            f"answers differ ({res['share']:.4f}, {res['confidence']:.0%} interval [{res['ci_low']:.4f}, "
            f"{res['ci_high']:.4f}]) {'>' if res['share'] > res['threshold'] else '<='} gates.max_serving_disagreement "
            f"{res['threshold']}{'' if not res.get('other_model') else ', but the endpoint reports another model'}: "
            f"{'PASS' if res['passed'] else 'FAIL'}; {res['metric']} served "
            f"{res['served_metric']:.4f}, evaluated {_f(res['evaluated_metric'])}")
    lines = [head] + [f"  cause: {c}" for c in res["causes"]]
    lines += [f"  row {e['id']}: evaluated {e['evaluated']!r}, served {e['served']!r}" for e in res["examples"]]
    return "\n".join(lines)


# ---------------------------------------------------------------- the result, on the registry

def record(res: dict, alias: str = SERVING_ALIAS, *, champion_alias: str = "champion", named: bool = False,
           lock_path: Path | None = None) -> dict:
    """The check's result as tags on the version (and serving/parity.json on its run); `alias` moves to the
    version only when the check passed, and only under the registry lock (`lock_path`; the caller holds the
    registered model's slot, flows.registry_slot), re-reading `champion_alias` there: a check of a version
    that is no longer champion (rolled back, replaced while the check ran, a webhook delivered late) moves
    nothing, unless the version was `named` explicitly. A rejected version is never served. Returns res
    with "alias_moved" and, when not moved, "not_moved" (why)."""
    from mlflow.tracking import MlflowClient

    from qlora_ops.tasks.registry import journal
    from qlora_ops.tasks.registry.register import REJECTED, _alias_holder, registry_lock

    c, name, v = MlflowClient(), res["model_name"], str(res["version"])
    tags = {"serving_check": "passed" if res["passed"] else "failed",
            "serving_disagreement": f"{res['share']:.4f}",
            "serving_disagreement_ci": f"[{res['ci_low']:.4f}, {res['ci_high']:.4f}]",
            "serving_metric": f"{res['metric']}={res['served_metric']:.4f}",
            "serving_checked": f"{res['checked_at']} {res['url']}",
            "serving_check_detail": explain(res)[:5000]}
    for k, val in tags.items():  # the check's facts: true whether or not the alias moves
        c.set_model_version_tag(name, v, k, val)
    c.log_text(res["run_id"], json.dumps(res, indent=2, sort_keys=True, default=str), PARITY_FILE)
    if not res["passed"]:
        return {**res, "alias": alias, "alias_moved": False, "not_moved": "the check failed"}
    with registry_lock(lock_path) if lock_path is not None else contextlib.nullcontext():
        if (done := journal.reconcile(c, name)) is not None:
            print(f"registry {name}: {done}", flush=True)
        champ = _alias_holder(c, name, champion_alias)
        status = (c.get_model_version(name, v).tags or {}).get("status")
        why = (f"v{v} is {REJECTED}" if status == REJECTED else
               None if named or champ == res["version"] else
               f"v{v} does not hold '{champion_alias}' now ({'v' + str(champ) if champ else 'none'}); "
               "name the version explicitly to serve it anyway")
        if why is None:  # one write: a kill leaves it moved or not, nothing between
            c.set_registered_model_alias(name, alias, v)
    moved = why is None and int(c.get_model_version_by_alias(name, alias).version) == res["version"]
    return {**res, "alias": alias, "alias_moved": moved, **({"not_moved": why} if why else {})}


def verify_serving(url: str, model_name: str, version: int, threshold: float, confidence: float, work: Path,
                   alias: str = SERVING_ALIAS, **move) -> dict:
    """check + record: what `qlora-ops verify-serving` and the webhook receiver run. `move`: record's
    champion_alias, named, lock_path (the caller holds the registered model's slot around it)."""
    return record(check(url, model_name, version, threshold, confidence, work), alias, **move)
