"""The retraining loop, wired: snapshot + version the data (DVC, pushed to the remote) -> skip if
nothing is new -> model stage (train QLoRA + LoRA baseline, evaluate, merge, evaluate merged; on the
GPU pool when `orchestration.gpu_pool` is set) -> gates -> register + promote under the registered
model's global slot -> run report (tasks/report/html.py; never changes the outcome).

    qlora-ops run                                # params/default.yaml, embedded SmolLM2, in-process
    qlora-ops run --params params/my-domain.yaml --force   # retrain and re-evaluate even if nothing is new
    qlora-ops deploy --params params/team.yaml   # the same flow as a scheduled deployment

The run's Prefect state says what happened: Completed (registered), Completed named Skipped (nothing
new: the same fingerprint as an earlier decision, tasks/model/keys.py), Failed named Rejected (a gate refused,
on the domain split or on a suite; the gate table is the message). Stages are plain functions in tasks/; this file decides order, what
passes between them (versions, URIs, small JSON) and the run's final state.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow
from prefect.states import Completed, Failed

from qlora_ops.flows import prefect_tasks as pt
from qlora_ops.flows import registry_slot, runtime
from qlora_ops.flows.model_stage import METRIC, model_stage
from qlora_ops.flows.remote_stage import MODEL_STAGE_FLOW, ModelStageFailed, remote_model_stage  # noqa: F401 (re-exported)
from qlora_ops.tasks.gates import gate
from qlora_ops.tasks.model import keys
from qlora_ops.tasks.report import html as report
from qlora_ops.tasks.report.card import model_card
from qlora_ops.tasks.report.gather import label_set
from qlora_ops.tasks.gates import paired, sizing
from qlora_ops.tasks.gates.policy import PromotionPolicy, power_check
from qlora_ops.tasks.evaluate import suites
from qlora_ops.tasks.intake.check import check_json_answers
from qlora_ops.tasks.registry import tracking
from qlora_ops.tasks.gates import ledger, verdict
from qlora_ops.tasks.gates.verdict import gate_decision  # noqa: F401  (the flow's decision; tests import it from here)
from qlora_ops.tasks.core.config import Params, load_params
from qlora_ops.tasks.core.paths import artifact_root, state_dir, tracking_uri, ws_path
from qlora_ops.tasks.core.util import read_json, read_jsonl
from qlora_ops.tasks.data.prepare import DataError
from qlora_ops.tasks.data import diff as data_diff
from qlora_ops.flows.summary import format_summary, gate_table
from qlora_ops.tasks.registry.register import Deferred, registry_experiment, repair as repair_registry
from qlora_ops.tasks.registry import manual



@flow(name="qlora-retrain", log_prints=True, persist_result=False)
def retrain(params_path: str = "params/default.yaml", workspace: str = ".", force: bool = False):
    s = run_pipeline(params_path, workspace, force)
    print(format_summary(s))
    if (q := (s.get("data", {}).get("changes") or {}).get("quarantined")) and s["outcome"] != "rejected":
        # its own state (exit 6): the run went on with the last good data, but a drop needs its author
        return Completed(name="Quarantined", data=s, message=f"{s['outcome']}; quarantined drop(s): "
                         + ", ".join(f"{x['name']} -> {x['to']}" for x in q))
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
    suites.check(params, ws, pfile)  # and on a suite file that is not there
    timed = runtime.StageTimer()
    times = timed.seconds

    uri = tracking_uri(ws, params)
    remote = uri.startswith(("http://", "https://"))
    runtime.check_services(uri, os.environ.get("PREFECT_API_URL"))
    registry_slot.check_binding(uri, params.registry.model_name, state_dir(ws, params))  # a shared registry: its writers' lock, before any work
    mlflow.set_tracking_uri(uri)
    exp_id = tracking.ensure_experiment(params.registry.experiment, artifact_root(ws, params).as_uri(), remote)

    # The suites' rows first: a bad row fails the run (file:line) before the data is versioned or anything trains.
    suites_dir, suite_hashes = suites.prepare(params, ws)
    data = timed("prepare", runtime.stage(pt.prepare_data, params, "prepare"), ws, pfile, params)
    prepared = Path(data["prepared_dir"])
    if "json_match" in (params.eval.metric, *params.eval.report_metrics):
        check_json_answers(prepared)  # as `check` does: a reference the metric cannot score fails before training
    test_hash = keys.rows_hash(prepared / "test.jsonl")
    n_test = sum(1 for _ in (prepared / "test.jsonl").open())
    # Rows no gate could ever pass on, or too few to tell a suite's margin: exit 2 before any training.
    sizing.refuse_small(params, min(n_test, params.eval.max_examples or n_test), suites.row_counts(params, suites_dir),
                        str(pfile))
    code = keys.code_version()
    fp = keys.fingerprint(data["data_version"], params, keys.base_fingerprint(params, ws), suite_hashes)
    summary: dict = {"tracking_uri": runtime.redact(uri), "code": code, "fingerprint": fp, "stage_seconds": times,
                     "libraries": keys.lib_versions(), "lock_hash": keys.lock_hash(), "forced": force,
                     "data": {k: data[k] for k in ("data_version", "stage", "outs", "deps")}}
    summary["data"]["version"] = data["data_version"]
    if (prepared / "stats.json").is_file():
        summary["data"]["stats"] = {k: v for k, v in read_json(prepared / "stats.json").items() if k != "labels"}
    # What this data version took in (files added/changed/removed/ignored) and the drops set aside.
    summary["data"]["changes"] = data_changes(data.get("source"))
    # What this version changed row by row against the previous one (tasks/data/diff.py): the data card.
    summary["data"]["diff"] = data_card(ws, params, data)
    refuse_contamination(summary["data"].get("stats") or {})  # before any training or gate
    # A registry commit a killed writer left (tasks.registry.journal) is finished before the skip check: a
    # promotion killed before its alias moved would otherwise read as "registered from the same inputs".
    with runtime.registry_slot(params.registry.model_name, params.orchestration.timeouts.registry, state_dir(ws, params)):
        if (done := repair_registry(params.registry.model_name, state_dir(ws, params) / "registry.lock")):
            print(f"registry {params.registry.model_name}: {done}")
    if not force and (why := tracking.find_fingerprint(params.registry.model_name, exp_id, fp)):
        times["total"] = round(time.time() - t_start, 1)
        return {**summary, "outcome": "skipped", "reason": f"nothing new: {why}; `--force` retrains and re-evaluates anyway"}

    run_id = tracking.start_run(params, exp_id, run_name=time.strftime("retrain-%Y%m%d-%H%M%S"), tags={
        "qlora_ops.params_file": str(pfile.relative_to(ws)), "qlora_ops.params_hash": params.digest(),
        "qlora_ops.fingerprint": fp, "qlora_ops.code_commit": str(code["git_commit"]),
        "qlora_ops.code_dirty": str(code["git_dirty"]), "qlora_ops.code_sha": code["source_sha"],
        "qlora_ops.decision_code_sha": code["decision_sha"], "qlora_ops.lock_hash": str(keys.lock_hash()),
        **{f"qlora_ops.suite.{n}": h for n, h in suite_hashes.items()},
        "qlora_ops.data_version": data["data_version"], "qlora_ops.dvc_stage": data["stage"],
        "qlora_ops.dvc_remote": data.get("remote", ""), "qlora_ops.forced": str(force).lower(),
        **{f"dvc.dep.{k}": v for k, v in data["deps"].items()}, **{f"dvc.out.{k}": v for k, v in data["outs"].items()}})
    summary["mlflow_run_id"] = run_id
    print(f"MLflow run {run_id} at {runtime.redact(uri)}")
    try:
        # The data hand-off and its provenance: the prepared splits, and the DVC files that name the
        # exact raw + prepared data in the remote (`dvc pull` with these reproduces them anywhere).
        data_uri = tracking.log_dir(run_id, prepared, "data/prepared")
        # The data card, logged with the model: this version, its file-level changes and its row diff.
        tracking.log_json(run_id, {k: summary["data"].get(k) for k in ("version", "stage", "outs", "stats", "changes", "diff")},
                          "data/data_card.json")
        for f in data.get("dvc_files", ["dvc.yaml", "dvc.lock"]):  # keep their workspace-relative paths
            tracking.log_files(run_id, [ws / f], "/".join(("dvc", *Path(f).parent.parts)))
        handoff = {"test_hash": test_hash, "suite_hashes": suite_hashes, "force": force}
        if suites_dir is not None:  # each suite's exact rows, on the run: what it was judged on
            handoff["suites_uri"] = tracking.log_dir(run_id, suites_dir, "data/suites")
        ms = timed("model_stage", call_model_stage, params, ws, run_id, data_uri, str(prepared), handoff,
                   str(suites_dir) if suites_dir else None)
        models = ms["models"]
        summary["worker"] = ms.get("worker")
        times.update({f"ms.{k}": v for k, v in ms.get("stage_seconds", {}).items()})  # inside the model stage
        summary["stage_peak_mb"] = timed.peak_mb  # the register stage's lands here too, as in stage_seconds
        timed.peak_mb.update({f"ms.{k}": v for k, v in ms.get("stage_peak_mb", {}).items()})
        rows = ms["rows"]
        verdicts, passed = gate_decision(params, ms)
        # every score with its interval, for the summary and the report
        verdict.with_intervals(params, models, rows)
        summary["suites"] = suite_summary(params, ms)
        summary["power"] = power_line(params, ms)
        summary["confidence"] = params.gates.confidence
        summary.update(models=models, gates=verdicts, passed=passed)
        tracking.log_metrics(run_id, {f"{m}.{k}": v[k] for m, v in models.items() for k in ("accuracy", "eos_rate")})
        tracking.log_metrics(run_id, {f"suite.{n}.{m}.{s['metric']}": v["score"] for n, s in summary["suites"].items()
                                      for m, v in s["models"].items()})
        # a suite's gate is named "<suite>:<role>"; MLflow keys get a dot there (a colon is refused on Windows)
        tracking.log_metrics(run_id, {f"gate.{v['name'].replace(':', '.')}": v["value"] for v in verdicts})
        tracking.log_metrics(run_id, {f"gate.{v['name'].replace(':', '.')}.passed": float(v["passed"]) for v in verdicts})
        tracking.log_json(run_id, verdicts, "gates.json")
        tracking.set_tags(run_id, {"qlora_ops.gates": "passed" if passed else "failed",
                                   "qlora_ops.gate_reason": gate.explain(verdicts)})
        if passed:
            summary["registry"] = timed("register", register, params, ws, run_id, ms, data, fp, code, summary)
            if summary["registry"].get("guards"):  # each guard against the champion, as the gates are logged
                tracking.log_json(run_id, summary["registry"]["guards"], "promotion_guards.json")
            tracking.set_tags(run_id, {"qlora_ops.registered_version": summary["registry"]["version"],
                                       "qlora_ops.promoted": summary["registry"]["promoted"]})
            summary["outcome"] = "deferred" if summary["registry"].get("deferred") else "registered"
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


def suite_summary(params: Params, ms: dict) -> dict:
    """summary["suites"]: per suite its metric, role, threshold and, per model, the score with its interval
    (the report and the model card render it)."""
    out = {}
    for s in params.eval.suites:
        r = ms["suites"][s.name]
        models = {m: dict(v) for m, v in r["models"].items()}
        verdict.with_suite_intervals(params, s, models, r["rows"])
        out[s.name] = {"metric": s.metric, "role": s.role, "threshold": s.threshold, "n": len(r["rows"]["base"]["ids"]),
                       "models": models}
    return out


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
    return power_check(policy(params), len(a), **paired.paired_noise(a, b, binary=m.binary), measured=what)


def call_model_stage(params: Params, ws: Path, run_id: str, data_uri: str, local_data: str, handoff: dict,
                     local_suites: str | None = None) -> dict:
    """In-process (the laptop default), or as its own deployment on the GPU pool, waiting for it.
    `handoff`: test_hash, suite_hashes, force, and suites_uri when there are suites."""
    args = dict(params=params.model_dump(mode="json"), run_id=run_id, **handoff)
    if not params.orchestration.gpu_pool:
        local = {"suites_uri": local_suites} if local_suites else {}
        return model_stage.with_options(timeout_seconds=params.orchestration.timeouts.model_stage)(
            **{**args, **local}, data_uri=local_data, workspace=str(ws))
    return remote_model_stage(params, run_id, {**args, "data_uri": data_uri})


def policy(params: Params) -> PromotionPolicy:
    return PromotionPolicy.from_registry(params.registry)


def register(params: Params, ws: Path, run_id: str, ms: dict, data: dict, fp: str, code: dict,
             summary: dict | None = None) -> dict:
    """Register the logged merged model and decide promotion, one run at a time per registered model."""
    r = params.registry
    models = ms["models"]

    def describe(version: int, promoted: bool, reason: str) -> str | None:
        # The model card, from the summary this run is about to log (the same renderer as the report's).
        try:
            stats_file = Path(data["prepared_dir"]) / "stats.json"
            counts = read_json(stats_file).get("labels") if stats_file.is_file() else None
            return model_card(summary, tracking.logged_params(params), label_set(params.data.labels, counts),
                                     {"version": version, "promoted": promoted, "reason": reason})
        except Exception as e:
            print(f"warning: model card not written ({type(e).__name__}: {str(e)[:300]})")
            return None

    lin = test_lineage(data)

    said: dict = {}

    def decide(champion_v: int) -> tuple[bool, str, dict]:
        out = decide_promotion(params, ws, run_id, ms, champion_v, lin, said)
        if summary is not None and said.get("guards"):  # the card (written next) shows each guard's verdict
            summary["promotion_guards"] = said["guards"]
        if summary is not None and said.get("restart"):  # and that comparisons restarted on a new test set
            summary["lineage_restart"] = said["restart"]
        return out

    if summary is not None:  # the card says what the ledger held when this version was decided
        summary["decisions_before"] = ledger.explain(_budget(params, lin))
    with runtime.registry_slot(r.model_name, params.orchestration.timeouts.registry, state_dir(ws, params)):
        res = runtime.stage(pt.register_and_promote, params, "registry")(
            model_uri=ms["model_uri"], model_name=r.model_name, alias=r.champion_alias,
            challenger_alias=r.challenger_alias, decide=decide, lock_path=state_dir(ws, params) / "registry.lock",
            describe=describe if summary else None,
            # Registered from the registrar's own checked copy, in an experiment no training job can write.
            registry_experiment=registry_experiment(r.experiment),
            tags={"data_version": data["data_version"], "mlflow_run_id": run_id, "params_hash": params.digest(),
                  **({"test_lineage": str(lin)} if lin is not None else {}),
                  "fingerprint": fp, "code_commit": str(code["git_commit"]), "code_sha": code["source_sha"],
                  "score_key": ms["score_key"], METRIC: repr(models["merged"]["accuracy"]),
                  # the metric `promote` and the next runs decide on, and the merged model's score on it
                  "gate_metric": params.eval.metric, "gate_score": repr(models["merged"].get("score", models["merged"]["accuracy"])),
                  "qlora_accuracy": str(models["qlora"]["accuracy"]), "base_accuracy": str(models["base"]["accuracy"]),
                  # The adapter (what multi-LoRA servers load) travels with the version, with the content
                  # hash its scores were keyed on (tasks/model/keys.py) and the merged weights' own.
                  "adapter_uri": f"runs:/{run_id}/adapters/qlora", "adapter_digest": ms.get("adapter_digests", {}).get("qlora", ""),
                  "merged_digest": ms.get("merged_digest", ""),
                  # Each suite's score key: a later run reuses these saved predictions when its key matches.
                  **{f"score_key.{n}": v["score_key"] for n, v in ms.get("suites", {}).items()}})
    return {**res, "decisions": ledger.explain(_budget(params, lin)), "guards": said.get("guards", [])}


def _budget(params: Params, lin: int | None) -> dict:
    try:
        return manual.budget(params.registry.model_name, policy(params), lin)
    except Exception:  # no registered model yet
        return ledger.account(policy(params), [], lin)


def decide_promotion(params: Params, ws: Path, run_id: str, ms: dict, champion_v: int,
                     lin: int | None = None, out: dict | None = None) -> tuple[bool, str, dict]:
    """Should the candidate take `champion` from v`champion_v`? Paired on the rows the model stage scored
    (a champion that moved meanwhile: see moved_champion)."""
    champ = ms.get("champion")
    if not champ or champ["version"] != champion_v:  # the champion moved while the model stage ran
        champ = moved_champion(params, ms, champion_v, state_dir(ws, params) / "model-stage" / run_id / "late-champion")
        guards = [] if not any(s.role == "non_inferior" for s in params.eval.suites) else None
    else:
        guards = verdict.champion_guards(params, ms)
    if guards is not None:  # per-class recall against the champion (gates.max_class_loss; [] when off)
        guards += verdict.class_guards(params, ms["rows"]["merged"], champ, test_references(params, ws))
    if guards is None:  # non_inferior suites guard against the champion too: not decidable without its rows
        raise Deferred(f"not decided: the guard suites were not scored on champion v{champion_v}; "
                       f"'{params.registry.champion_alias}' stays; the next run decides")
    # The decision ledger (tasks.gates.ledger): every look at this lineage's test rows spends part of the
    # yearly false-promotion budget; spent, nothing is decided automatically on these rows.
    pol = policy(params)
    if not (b := manual.budget(params.registry.model_name, pol, lin))["can_decide"]:
        raise Deferred(ledger.spent_message(b, "<params file>"))
    d = verdict.promotion(params, ms["rows"]["merged"], champ, guards)
    if out is not None:
        out["guards"] = d["guards"]  # what each guard said, for the summary, the run and the card
        if lin is not None and (was := manual.version_lineage(params.registry.model_name, champion_v)) != lin:
            # the champion was decided on other test rows: from here on both are compared on this lineage's
            out["restart"] = (f"test-set lineage {lin} is new to champion v{champion_v} (decided on "
                              f"{'lineage ' + str(was) if was is not None else 'a test set before lineages'}): "
                              f"comparisons with the champion restart on these test rows; the champion was "
                              f"{champ['how']}")
    return (d["promote"], f"{d['reason']} (champion v{champion_v}: {champ['how']})",
            dict([ledger.entry_tag(pol.alpha, lin, f"run {run_id}")]))


def test_references(params: Params, ws: Path) -> dict[str, str]:
    """Test row id -> its reference answer (a label task's class), from the prepared test split."""
    f = ws_path(ws, params.data.prepared) / "test.jsonl"
    return {r["id"]: str(r["completion"]).strip() for r in read_jsonl(f)} if f.is_file() else {}


def test_lineage(data: dict) -> int | None:
    """The test-set lineage of the prepared data (its stats.json), None where it has none."""
    stats_file = Path(data.get("prepared_dir", "")) / "stats.json"
    lin = read_json(stats_file).get("lineage") if data.get("prepared_dir") and stats_file.is_file() else None
    return int(lin) if lin is not None else None


def moved_champion(params: Params, ms: dict, champion_v: int, work: Path) -> dict:
    """The per-row results of a champion that moved while the model stage ran, only where they were scored
    as the candidate was (same score key: test rows, eval code, device, dtype): its own saved predictions.
    Otherwise the decision is deferred (register.Deferred), not re-scored here: this is the parent's CPU
    inside the registry slot, so the champion would be scored on other hardware than the GPU candidate
    (under the candidate's score key), and a GPU re-score would hold every registry writer for a model
    stage. The champion stays; the version is registered `deferred` and the next run decides."""

    was = (ms.get("champion") or {}).get("version")
    moved = f"the champion moved from {f'v{was}' if was else 'none'} to v{champion_v} while this run's model stage ran"
    try:
        champ_key, rows = manual.version_rows(params.registry.model_name, champion_v, work)
    except Exception as e:  # no saved predictions (or no run) to compare with
        champ_key, rows, why = None, None, f"its saved predictions could not be read ({type(e).__name__}: {str(e)[:200]})"
    else:
        why = f"its saved predictions were scored under another score key ({champ_key or 'none'} != {ms['score_key']})"
    if champ_key != ms["score_key"]:
        raise Deferred(f"not decided: {moved}, and {why}; re-scoring it here would not score it where the candidate "
                       f"was scored. '{params.registry.champion_alias}' stays on v{champion_v}; the next run decides "
                       "(this version does not count as a decision), or `qlora-ops promote` by hand")
    return {"version": champion_v, "how": "its own saved predictions (same score key; it moved during the model stage)",
            **rows}


def data_changes(source: dict | None) -> dict | None:
    """The snapshot's file lists (tasks.data.sources.snapshot) and the quarantined drops, for the summary."""
    if not source:
        return None
    return {k: source.get(k, []) for k in ("added", "changed", "removed", "ignored", "quarantined")}


def data_card(ws: Path, params: Params, data: dict) -> dict:
    """summary["data"]["diff"]: this data version against the previous one this workspace prepared for the
    same DVC stage, whose rows are kept (gzipped, the last few) under <state_dir>/data-versions/<stage>/
    because DVC overwrites the prepared dir. {version, first: true} the first time; {version, error} when
    the diff could not be computed: the diff only describes the data, so it never fails the run."""
    store = state_dir(ws, params) / "data-versions" / data["stage"]
    prepared = Path(data["prepared_dir"])
    out: dict = {"version": data["data_version"]}
    try:
        if (prev := data_diff.previous(store, data["data_version"])) is None:
            out["first"] = True
        else:
            out.update(previous=prev.name, **data_diff.diff_rows(prev, prepared, params.data.split.near_dup_threshold,
                                                                 params.data.labels))
    except Exception as e:  # a describing step: one line, and the run goes on
        out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(f"warning: data diff not computed ({out['error']})")
    try:
        data_diff.remember(store, data["data_version"], prepared)
    except OSError as e:  # only the next run's diff needs it
        print(f"warning: data version {data['data_version']} not kept for the next diff ({e})")
    return out


def refuse_contamination(stats: dict) -> None:
    """A test row whose near-duplicate cluster was ever trained on (tasks/data/split.py) makes every score
    on that test set suspect: 0 is required before anything trains or is promoted."""
    if n := stats.get("contamination"):
        raise DataError(f"contamination: {n} test row(s) are near-duplicates of rows a model trained on (test-set "
                        f"lineage {stats.get('lineage')}); nothing is trained or promoted on this test set. Remove "
                        "the rows that join them (usually a new row close to both a test and a train row), or start "
                        "a new test-set lineage: qlora-ops data new-lineage --params <file>")
