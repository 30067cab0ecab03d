"""The retraining loop, wired: snapshot + version the data (DVC, pushed to the remote) -> skip if
nothing is new -> model stage (train QLoRA + LoRA baseline, evaluate, merge, evaluate merged; on the
GPU pool when `orchestration.gpu_pool` is set) -> gates -> register + promote under the registered
model's global slot -> run report (tasks/report.py; never changes the outcome).

    qlora-ops run                                # params/default.yaml, embedded SmolLM2, in-process
    qlora-ops run --params params/my-domain.yaml --force
    qlora-ops deploy --params params/team.yaml   # the same flow as a scheduled deployment

The run's Prefect state says what happened: Completed (registered), Completed named Skipped (nothing
new: same data, params, code and base as an earlier decision), Failed named Rejected (a gate refused;
the gate table is the message). Stages are plain functions in tasks/; this file decides order, what
passes between them (versions, URIs, small JSON) and the run's final state.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from prefect import flow
from prefect.states import Completed, Failed

from flows import prefect_tasks as pt
from flows import runtime
from flows.model_stage import METRIC, RESULT, champion_rows, key, model_stage
from tasks import gate, report, stats, tracking
from tasks.base_model import base_fingerprint
from tasks.config import Params, load_params
from tasks.paths import artifact_root, state_dir, tracking_uri, ws_path
from tasks.util import read_json, sha256_file
from tasks.versioning import code_version

MODEL_STAGE_FLOW = "qlora-model-stage"


def fingerprint(data_version: str, params: Params, code_sha: str, base_fp: str) -> str:
    """Everything that decides the model and its verdict: a run with the same one has nothing new to do."""
    return key(data_version, params.model_digest(), code_sha, base_fp)


@flow(name="qlora-retrain", log_prints=True, persist_result=False)
def retrain(params_path: str = "params/default.yaml", workspace: str = ".", force: bool = False):
    s = run_pipeline(params_path, workspace, force)
    print(format_summary(s))
    if s["outcome"] == "skipped":
        return Completed(name="Skipped", message=s["reason"], data=s)
    if s["outcome"] == "rejected":
        return Failed(name="Rejected", message=gate_table(s["gates"]), data=s)
    r = s["registry"]
    return Completed(message=f"registered {r['model_name']} v{r['version']}; '{r['alias']}' -> v{r['champion_version']}",
                     data=s)


def run_pipeline(params_path: str, workspace: str, force: bool = False) -> dict:
    import mlflow

    t_start = time.time()
    ws = Path(workspace).resolve()
    pfile = ws_path(ws, params_path)
    params = load_params(pfile)  # fails here, before any work, on a bad key
    timed = runtime.StageTimer()
    times = timed.seconds

    uri = tracking_uri(ws, params)
    remote = uri.startswith(("http://", "https://"))
    runtime.check_services(uri, os.environ.get("PREFECT_API_URL"))
    mlflow.set_tracking_uri(uri)
    exp_id = tracking.ensure_experiment(params.registry.experiment, artifact_root(ws, params).as_uri(), remote)

    data = timed("prepare", runtime.stage(pt.prepare_data, params, "prepare"), ws, pfile, params)
    prepared = Path(data["prepared_dir"])
    test_hash = sha256_file(prepared / "test.jsonl")[:16]
    code = code_version()
    fp = fingerprint(data["data_version"], params, code["source_sha"], base_fingerprint(params, ws))
    summary: dict = {"tracking_uri": runtime.redact(uri), "code": code, "fingerprint": fp, "stage_seconds": times,
                     "data": {k: data[k] for k in ("data_version", "stage", "outs", "deps")}}
    summary["data"]["version"] = data["data_version"]
    if (prepared / "stats.json").is_file():
        summary["data"]["stats"] = {k: v for k, v in read_json(prepared / "stats.json").items() if k != "labels"}
    if not force and (why := tracking.find_fingerprint(params.registry.model_name, exp_id, fp)):
        times["total"] = round(time.time() - t_start, 1)
        return {**summary, "outcome": "skipped", "reason": f"nothing new: {why}; `--force` retrains anyway"}

    run_id = tracking.start_run(params, exp_id, run_name=time.strftime("retrain-%Y%m%d-%H%M%S"), tags={
        "qlora_ops.params_file": str(pfile.relative_to(ws)), "qlora_ops.params_hash": params.digest(),
        "qlora_ops.fingerprint": fp, "qlora_ops.code_commit": str(code["git_commit"]),
        "qlora_ops.code_dirty": str(code["git_dirty"]), "qlora_ops.code_sha": code["source_sha"],
        "qlora_ops.data_version": data["data_version"], "qlora_ops.dvc_stage": data["stage"],
        "qlora_ops.dvc_remote": data.get("remote", ""), "qlora_ops.forced": str(force).lower(),
        **{f"dvc.dep.{k}": v for k, v in data["deps"].items()}, **{f"dvc.out.{k}": v for k, v in data["outs"].items()}})
    summary["mlflow_run_id"] = run_id
    print(f"MLflow run {run_id} at {runtime.redact(uri)}")
    try:
        # The data hand-off and its provenance: the prepared splits, and the DVC files that name the
        # exact raw + prepared data in the remote (`dvc pull` with these reproduces them anywhere).
        data_uri = tracking.log_dir(run_id, prepared, "data/prepared")
        for f in data.get("dvc_files", ["dvc.yaml", "dvc.lock"]):  # keep their workspace-relative paths
            tracking.log_files(run_id, [ws / f], "/".join(("dvc", *Path(f).parent.parts)))
        ms = timed("model_stage", call_model_stage, params, ws, run_id, data_uri, str(prepared), test_hash)
        models = ms["models"]
        summary["worker"] = ms.get("worker")
        times.update({f"ms.{k}": v for k, v in ms.get("stage_seconds", {}).items()})  # inside the model stage
        summary["stage_peak_mb"] = timed.peak_mb  # the register stage's lands here too, as in stage_seconds
        timed.peak_mb.update({f"ms.{k}": v for k, v in ms.get("stage_peak_mb", {}).items()})
        rows = ms["rows"]
        verdicts, passed = gate_decision(params, ms)
        for name, m in models.items():  # every accuracy with its interval, for the summary and the report
            m["ci_low"], m["ci_high"] = stats.accuracy_interval(rows[name]["correct"], params.gates.confidence)
        summary["power"] = power_line(params, ms)
        summary["confidence"] = params.gates.confidence
        summary.update(models=models, gates=verdicts, passed=passed)
        tracking.log_metrics(run_id, {f"{m}.{k}": v[k] for m, v in models.items() for k in ("accuracy", "eos_rate")})
        tracking.log_metrics(run_id, {f"gate.{v['name']}": v["value"] for v in verdicts})
        tracking.log_metrics(run_id, {f"gate.{v['name']}.passed": float(v["passed"]) for v in verdicts})
        tracking.log_json(run_id, verdicts, "gates.json")
        tracking.set_tags(run_id, {"qlora_ops.gates": "passed" if passed else "failed",
                                   "qlora_ops.gate_reason": gate.explain(verdicts)})
        if passed:
            summary["registry"] = timed("register", register, params, ws, run_id, ms, data, fp, code, summary)
            tracking.set_tags(run_id, {"qlora_ops.registered_version": summary["registry"]["version"],
                                       "qlora_ops.promoted": summary["registry"]["promoted"]})
            summary["outcome"] = "registered"
        else:
            summary["registry"] = {"registered": False, "reason": gate.explain(verdicts)}
            summary["outcome"] = "rejected"
        times["total"] = round(time.time() - t_start, 1)
        tracking.log_metrics(run_id, {f"seconds.{k}": v for k, v in times.items()})
        tracking.set_tags(run_id, {"qlora_ops.outcome": summary["outcome"]})
        tracking.log_json(run_id, summary, "summary.json")
        tracking.end_run(run_id, "FINISHED")
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    summary["report"] = publish_report(params, ws, run_id, summary)
    return summary


def publish_report(params: Params, ws: Path, run_id: str, summary: dict) -> str | None:
    """The run report on the run (and the registered version); its failure is one warning line and
    never changes the run's outcome: the decision is already recorded, the report only shows it."""
    try:
        v = summary.get("registry", {}).get("version")
        return str(report.publish(run_id, state_dir(ws, params) / "reports" / run_id, params.registry.model_name, v))
    except Exception as e:
        print(f"warning: run report not written ({type(e).__name__}: {str(e)[:300]}); "
              f"`qlora-ops report {run_id}` rebuilds it")
        return None


def gate_decision(params: Params, ms: dict) -> tuple[list[dict], bool]:
    """Every gate on the model stage's saved per-row results, and whether the candidate may be registered:
    all gates passed AND a merged model was logged (the stage merges only after the pre-merge gates pass)."""
    rows, m = ms["rows"], gate.gate_metric(params)
    sc = {name: gate.gate_scores(r, m) for name, r in rows.items()}
    verdicts = gate.pre_merge_gates(params.gates, m, sc["base"], sc["lora"], sc["qlora"], seed=params.seed)
    if "merged" in rows:
        verdicts.append(gate.merge_gate(params.gates, m, sc["qlora"], sc["merged"], rows["qlora"]["answers"],
                                        rows["merged"]["answers"], seed=params.seed))
    return verdicts, gate.passed(verdicts) and ms.get("model_uri") is not None


def power_line(params: Params, ms: dict) -> str | None:
    """The promotion policy's power on this test set, at the noise measured on this run's rows: merged vs
    champion when the champion was scored on the same rows, else QLoRA vs LoRA (two models trained on the
    same data, the nearest pair to two retrains) -- not an assumed discordance."""
    rows, m, champ = ms["rows"], gate.gate_metric(params), ms.get("champion")
    if champ and "merged" in rows and champ.get("ids") == rows["merged"].get("ids"):
        pair, what = (rows["merged"], champ), f"merged vs champion v{champ['version']}"
    else:
        pair, what = (rows["qlora"], rows["lora"]), "QLoRA vs LoRA"
    a, b = (gate.gate_scores(r, m) for r in pair)
    return stats.power_check(policy(params), len(a), **stats.paired_noise(a, b, binary=m.binary), measured=what)


def call_model_stage(params: Params, ws: Path, run_id: str, data_uri: str, local_data: str, test_hash: str) -> dict:
    """In-process (the laptop default), or as its own deployment on the GPU pool, waiting for it."""
    args = dict(params=params.model_dump(mode="json"), run_id=run_id, test_hash=test_hash)
    if not params.orchestration.gpu_pool:
        return model_stage.with_options(timeout_seconds=params.orchestration.timeouts.model_stage)(
            **args, data_uri=local_data, workspace=str(ws))
    return remote_model_stage(params, run_id, {**args, "data_uri": data_uri})


def remote_model_stage(params: Params, run_id: str, args: dict) -> dict:
    """Run the GPU deployment and read its result from the run's artifacts. A lost worker (Crashed) or
    a transient failure starts it again with backoff (Prefect never retries a Crashed run by itself);
    anything else ends here with the child's own message."""
    import mlflow
    from prefect.deployments import run_deployment

    name = f"{MODEL_STAGE_FLOW}/{params.orchestration.deployment}"
    delays = runtime.backoff(params)
    for attempt in range(len(delays) + 1):
        fr = run_deployment(name, parameters=args, timeout=params.orchestration.timeouts.model_stage,
                            flow_run_name=f"model-stage-{run_id[:8]}-{attempt + 1}")
        st = fr.state
        if st is not None and st.is_completed():
            text = mlflow.artifacts.load_text(f"runs:/{run_id}/{RESULT}")
            return json.loads(text)
        msg = f"{name} run {fr.id} ended {st.name if st else 'without a state'}: {st.message if st else ''}"
        if st is not None and not st.is_final():
            raise TimeoutError(f"{name} run {fr.id} still {st.name} after "
                               f"{params.orchestration.timeouts.model_stage:g} s (orchestration.timeouts.model_stage)")
        retry = st is not None and (st.is_crashed() or runtime.is_transient(RuntimeError(st.message or "")))
        if not retry or attempt == len(delays):
            raise ModelStageFailed(msg)
        print(f"{msg}; starting it again in {delays[attempt]:g} s")
        time.sleep(delays[attempt])
    raise AssertionError("unreachable")


class ModelStageFailed(RuntimeError):
    pass


def policy(params: Params) -> stats.PromotionPolicy:
    return stats.PromotionPolicy.from_registry(params.registry)


def register(params: Params, ws: Path, run_id: str, ms: dict, data: dict, fp: str, code: dict,
             summary: dict | None = None) -> dict:
    """Register the logged merged model and decide promotion, one run at a time per registered model."""
    r = params.registry
    models, cand = ms["models"], ms["rows"]["merged"]

    def describe(version: int, promoted: bool, reason: str) -> str | None:
        # The model card, from the summary this run is about to log (the same renderer as the report's).
        try:
            stats_file = Path(data["prepared_dir"]) / "stats.json"
            counts = read_json(stats_file).get("labels") if stats_file.is_file() else None
            return report.model_card(summary, tracking.logged_params(params), report.label_set(params.data.labels, counts),
                                     {"version": version, "promoted": promoted, "reason": reason})
        except Exception as e:
            print(f"warning: model card not written ({type(e).__name__}: {str(e)[:300]})")
            return None

    def decide(champion_v: int) -> tuple[bool, str]:
        champ = ms.get("champion")
        if not champ or champ["version"] != champion_v:  # the champion moved after the model stage ran
            work = state_dir(ws, params) / "model-stage" / run_id / "late-champion"
            champ = champion_rows(params, ms["score_key"], Path(data["prepared_dir"]) / "test.jsonl", work)
        if champ["ids"] != cand["ids"]:
            raise RuntimeError(f"champion v{champion_v} was scored on other rows than the candidate; not comparable")
        m = gate.gate_metric(params)
        d = stats.decide(policy(params), gate.gate_scores(cand, m), gate.gate_scores(champ, m), seed=params.seed,
                         higher_is_better=m.higher_is_better, binary=m.binary, metric_name=m.name)
        return d["promote"], f"{d['reason']} (champion v{champion_v}: {champ['how']})"

    with runtime.registry_slot(r.model_name, params.orchestration.timeouts.registry):
        return runtime.stage(pt.register_and_promote, params, "registry")(
            model_uri=ms["model_uri"], model_name=r.model_name, alias=r.champion_alias,
            challenger_alias=r.challenger_alias, decide=decide, lock_path=state_dir(ws, params) / "registry.lock",
            describe=describe if summary else None,
            tags={"data_version": data["data_version"], "mlflow_run_id": run_id, "params_hash": params.digest(),
                  "fingerprint": fp, "code_commit": str(code["git_commit"]), "code_sha": code["source_sha"],
                  "score_key": ms["score_key"], METRIC: repr(models["merged"]["accuracy"]),
                  "qlora_accuracy": str(models["qlora"]["accuracy"]), "base_accuracy": str(models["base"]["accuracy"]),
                  # The adapter (what multi-LoRA servers load) travels with the version.
                  "adapter_uri": f"runs:/{run_id}/adapters/qlora"})


def gate_table(verdicts: list[dict]) -> str:
    levels = {v.get("confidence") for v in verdicts}
    head = f"{stats.level(levels.pop())} interval" if len(levels) == 1 and None not in levels else "interval"
    L = [f"{'gate':<20}{'value':>8}  {head:<17}{'op':<3}{'threshold':>9}  verdict"]
    for v in verdicts:
        # The interval of the gate's own value; retention's (of QLoRA - LoRA) is in its detail line.
        ci = f"[{v['ci_low']:.3f}, {v['ci_high']:.3f}]" if v.get("ci_low") is not None and v["ci_of"] == "value" else ""
        L.append(f"{v['name']:<20}{v['value']:>8.4f}  {ci:<17}{v['op']:<3}{v['threshold']:>9}  "
                 f"{'PASS' if v['passed'] else 'FAIL'}  ({v['decided_on']})")
    return "\n".join(L)


def format_summary(s: dict) -> str:
    L = ["", "=" * 72]
    if s["outcome"] == "skipped":
        L += [f"qlora-ops: skipped. {s['reason']}",
              f"data version {s['data']['version']}   fingerprint {s['fingerprint']}",
              f"total wall time: {s['stage_seconds'].get('total', 0):.1f} s", "=" * 72]
        return "\n".join(L)
    L += [f"qlora-ops summary  mlflow run {s['mlflow_run_id']}",
          f"data version {s['data']['version']} ({s['data']['stage']})   code {str(s['code']['git_commit'])[:10]}"
          f"{' (dirty)' if s['code']['git_dirty'] else ''} sha {s['code']['source_sha']}   fingerprint {s['fingerprint']}",
          *([f"rows train/val/test {st['train']}/{st['val']}/{st['test']}, inputs truncated to "
             f"{st['max_input_chars']} chars: {st['inputs_truncated']}"]
            if (st := s["data"].get("stats")) and "inputs_truncated" in st else []),
          "", f"{'model':<10}{'accuracy':>10}  {stats.level(s.get('confidence', 0.95)) + ' interval':<17}"
          f"{'eos_rate':>8}{'n':>6}{'eval_s':>9}"]
    for name, m in s["models"].items():
        ci = f"[{m['ci_low']:.3f}, {m['ci_high']:.3f}]" if "ci_low" in m else ""
        L.append(f"{name:<10}{m['accuracy']:>10.4f}  {ci:<17}{m['eos_rate']:>8.2f}{m['n']:>6}{m['eval_seconds']:>9.1f}"
                 f"{'  (cached)' if m.get('cached') else ''}")
    L += ["", gate_table(s["gates"])]
    L += [f"  {v['name']}: {v['detail']}" for v in s["gates"]]
    if s.get("power"):
        L.append(f"note: {s['power']}")
    L.append("")
    r = s["registry"]
    if r.get("version"):
        L.append(f"registry: {r['model_name']} v{r['version']} registered; alias '{r['alias']}' -> v{r['champion_version']} "
                 f"({r['reason']})")
    else:
        L.append(f"registry: nothing registered ({r['reason']})")
    L.append("stage seconds: " + " | ".join(f"{k} {v}" for k, v in s["stage_seconds"].items() if k != "total"))
    if s.get("stage_peak_mb"):
        L.append("stage peak MiB: " + " | ".join(f"{k} {v:.0f}" for k, v in s["stage_peak_mb"].items()))
    if s.get("report"):
        L.append(f"report: {s['report']}")
    L.append(f"total wall time: {s['stage_seconds'].get('total', 0):.1f} s")
    L.append("=" * 72)
    return "\n".join(L)
