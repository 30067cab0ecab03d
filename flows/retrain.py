"""The retraining loop, wired: prepare (DVC) -> base model -> QLoRA + LoRA baseline -> evaluate
base / LoRA / QLoRA -> gates -> merge -> evaluate merged -> MLflow registry (+ champion alias).

    qlora-ops run                                # params/default.yaml, embedded SmolLM2
    qlora-ops run --params params/my-domain.yaml

Stages are plain functions in tasks/; this file only decides order and what passes between them
(paths and small dicts). Expensive stages cache on content: a run dir keyed by data hash + params
hash + code hash, so a re-run after a crash resumes and an identical re-run reuses results.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from prefect import flow

from tasks import gate, prefect_tasks as pt, register, tracking
from tasks.base_model import base_identity
from tasks.config import Params, load_params
from tasks.paths import artifact_root, state_dir, tracking_uri, ws_path
from tasks.util import read_json, sha256_file
from tasks.versioning import code_version, source_hash


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached_eval(params: Params, cache: Path, name: str, key: str, **kw) -> dict:
    """Evaluate once per (model, test set, eval params, code) key; a hit reads metrics.json."""
    out = cache / f"{name}-{key}"
    if (out / "metrics.json").is_file():
        return {**read_json(out / "metrics.json"), "cached": True}
    return pt.evaluate_model(params, name, out_dir=str(out), **kw)


@flow(name="qlora-retrain", log_prints=True)
def retrain(params_path: str = "params/default.yaml", workspace: str = ".") -> dict:
    import mlflow

    t_start = time.time()
    ws = Path(workspace).resolve()
    pfile = ws_path(ws, params_path)
    params = load_params(pfile)  # fails here, before any work, on a bad key
    sd = state_dir(ws, params)
    times: dict[str, float] = {}

    def timed(stage: str, fn, *a, **k):
        t = time.time()
        r = fn(*a, **k)
        times[stage] = round(time.time() - t, 1)
        return r

    uri = tracking_uri(ws, params)
    mlflow.set_tracking_uri(uri)
    exp_id = tracking.ensure_experiment(params.registry.experiment,
                                        artifact_root(ws, params).as_uri() if not params.registry.tracking_uri else None)
    code = code_version()
    run_id = tracking.start_run(params, exp_id, run_name=time.strftime("retrain-%Y%m%d-%H%M%S"), tags={
        "qlora_ops.params_file": str(pfile), "qlora_ops.params_hash": params.digest(),
        "qlora_ops.code_commit": str(code["git_commit"]), "qlora_ops.code_dirty": str(code["git_dirty"]),
        "qlora_ops.code_sha": code["source_sha"]})
    print(f"MLflow run {run_id} at {uri}")
    run_dir = sd / "flow-runs" / run_id
    summary: dict = {"mlflow_run_id": run_id, "tracking_uri": uri, "code": code, "stage_seconds": times}
    try:
        data = timed("prepare", pt.prepare_data, ws, pfile, params)
        summary["data"] = {"version": data["data_version"], "stage": data["stage"], "outs": data["outs"], "deps": data["deps"]}
        tracking.set_tags(run_id, {"qlora_ops.data_version": data["data_version"], "qlora_ops.dvc_stage": data["stage"],
                                   **{f"dvc.dep.{k}": v for k, v in data["deps"].items()},
                                   **{f"dvc.out.{k}": v for k, v in data["outs"].items()}})
        prepared = Path(data["prepared_dir"])
        test_path = prepared / "test.jsonl"
        test_hash = sha256_file(test_path)[:16]

        base = timed("base_model", pt.resolve_base, params, ws)
        base_id = base_identity(Path(base))
        data_hash = _key(sha256_file(prepared / "train.jsonl"), sha256_file(prepared / "val.jsonl"))
        train_code = source_hash("train.py", "prompting.py", "config.py")
        train_key = _key(data_hash, base_id, train_code, params.digest("seed", "model", "quantization", "lora", "training"))

        results = {}
        for kind in ("qlora", "lora"):
            results[kind] = timed(f"train_{kind}", pt.train_adapter, params, base, str(prepared),
                                  str(sd / "runs" / f"train-{kind}-{train_key}"), kind)
            tracking.log_training(run_id, exp_id, results[kind])

        eval_key = _key(test_hash, train_code, source_hash("evaluate.py"), params.digest("eval", "quantization", "seed"))
        cache = sd / "cache" / "eval"
        ev = {
            "base": timed("eval_base", _cached_eval, params, cache, "base", _key(eval_key, base_id),
                          model_dir=base, test_path=str(test_path)),
            "lora": timed("eval_lora", _cached_eval, params, cache, "lora", _key(eval_key, train_key),
                          model_dir=base, test_path=str(test_path), adapter_dir=results["lora"]["adapter_dir"]),
            "qlora": timed("eval_qlora", _cached_eval, params, cache, "qlora", _key(eval_key, train_key),
                           model_dir=base, test_path=str(test_path), adapter_dir=results["qlora"]["adapter_dir"], quantized=True),
        }
        verdicts = timed("gates", pt.pre_merge_gates, params, ev["base"]["accuracy"], ev["lora"]["accuracy"], ev["qlora"]["accuracy"])
        merged_dir = run_dir / "merged"
        if gate.passed(verdicts):
            timed("merge", pt.merge_adapter, params, base, results["qlora"]["adapter_dir"], str(merged_dir))
            # Not cached: this re-check is of the bytes we are about to register.
            ev["merged"] = timed("eval_merged", pt.evaluate_model, params, "merged", str(merged_dir), str(test_path),
                                 str(run_dir / "eval-merged"))
            verdicts.append(gate.merge_gate(params.gates, ev["qlora"]["accuracy"], ev["merged"]["accuracy"]))
        else:
            print("gates failed before merge: not merging, nothing will be registered")
        summary.update(models=ev, gates=verdicts, passed=gate.passed(verdicts))
        tracking.log_metrics(run_id, {f"{m}.{k}": v[k] for m, v in ev.items() for k in ("accuracy", "eos_rate")})
        tracking.log_metrics(run_id, {f"gate.{v['name']}": v["value"] for v in verdicts})
        tracking.log_metrics(run_id, {f"gate.{v['name']}.passed": float(v["passed"]) for v in verdicts})
        tracking.log_json(run_id, verdicts, "gates.json")
        tracking.set_tags(run_id, {"qlora_ops.gates": "passed" if summary["passed"] else "failed",
                                   "qlora_ops.gate_reason": gate.explain(verdicts)})

        if summary["passed"]:
            def eval_champion(model_dir: Path) -> float:
                return pt.evaluate_model(params, "champion", str(model_dir), str(test_path),
                                         str(run_dir / "eval-champion"))["accuracy"]

            def _register():
                uri_ = register.log_merged_model(merged_dir, {"system_prompt": params.data.system_prompt,
                                                              "max_new_tokens": params.eval.max_new_tokens}, run_id=run_id)
                return register.register_and_promote(
                    model_uri=uri_, model_name=params.registry.model_name, alias=params.registry.champion_alias,
                    candidate_metric=ev["merged"]["accuracy"], metric_name="test_accuracy", test_hash=test_hash,
                    tags={"data_version": data["data_version"], "mlflow_run_id": run_id, "params_hash": params.digest(),
                          "code_commit": str(code["git_commit"]), "code_sha": code["source_sha"],
                          "qlora_accuracy": str(ev["qlora"]["accuracy"]), "base_accuracy": str(ev["base"]["accuracy"])},
                    evaluate_champion=eval_champion, min_improvement=params.registry.min_improvement,
                    lock_path=sd / "registry.lock")

            summary["registry"] = timed("register", _register)
            tracking.set_tags(run_id, {"qlora_ops.registered_version": summary["registry"]["version"],
                                       "qlora_ops.promoted": summary["registry"]["promoted"]})
            shutil.rmtree(merged_dir, ignore_errors=True)  # the registry holds its own copy
        else:
            summary["registry"] = {"registered": False, "reason": gate.explain(verdicts)}
        times["total"] = round(time.time() - t_start, 1)
        tracking.log_metrics(run_id, {f"seconds.{k}": v for k, v in times.items()})
        tracking.log_json(run_id, summary, "summary.json")
        tracking.end_run(run_id, "FINISHED")
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    print(format_summary(summary))
    return summary


def format_summary(s: dict) -> str:
    L = ["", "=" * 72, f"qlora-ops summary  mlflow run {s['mlflow_run_id']}",
         f"data version {s['data']['version']} ({s['data']['stage']})   code {str(s['code']['git_commit'])[:10]}"
         f"{' (dirty)' if s['code']['git_dirty'] else ''} sha {s['code']['source_sha']}", "",
         f"{'model':<10}{'accuracy':>10}{'eos_rate':>10}{'n':>6}{'eval_s':>9}"]
    for name, m in s["models"].items():
        L.append(f"{name:<10}{m['accuracy']:>10.4f}{m['eos_rate']:>10.2f}{m['n']:>6}{m['eval_seconds']:>9.1f}"
                 f"{'  (cached)' if m.get('cached') else ''}")
    L += ["", f"{'gate':<20}{'value':>10}  {'op':<3}{'threshold':>10}  verdict"]
    for v in s["gates"]:
        L.append(f"{v['name']:<20}{v['value']:>10.4f}  {v['op']:<3}{v['threshold']:>10}  {'PASS' if v['passed'] else 'FAIL'}  {v['detail']}")
    r = s["registry"]
    L.append("")
    if r.get("version"):
        L.append(f"registry: {r['model_name']} v{r['version']} registered; alias '{r['alias']}' -> v{r['champion_version']} "
                 f"({r['reason']})")
    else:
        L.append(f"registry: nothing registered ({r['reason']})")
    L.append("stage seconds: " + " | ".join(f"{k} {v}" for k, v in s["stage_seconds"].items() if k != "total"))
    L.append(f"total wall time: {s['stage_seconds'].get('total', 0):.1f} s")
    L.append("=" * 72)
    return "\n".join(L)
