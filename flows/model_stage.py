"""The GPU stage: everything that needs the model. Train QLoRA and the LoRA baseline, evaluate base /
LoRA / QLoRA on the test split and on every extra suite (eval.suites), merge the adapter and evaluate the
merged model, evaluate the current champion where its scores are unknown.

With `orchestration.gpu_pool` set, the parent flow (flows/retrain.py) starts this as its own
deployment on the GPU pool and waits; otherwise it runs in the parent's process. Either way it takes
only versions and URIs (the parent's MLflow run id, where the prepared data and suites are) and leaves
everything a later stage or a user needs in that run's artifact store: adapters, eval predictions,
the merged model (logged as a pyfunc model), and `model_stage.json`, the small result the parent
reads. Nothing here depends on a path the parent's machine has.

Caches (tasks/model/keys.py has the rule): an adapter is reused under its train key; an evaluation under its
eval key = score key + the CONTENT of what it evaluates, so a rebuilt or non-deterministic adapter is
scored again, and the adapter that is logged, merged and registered is the one whose answers the gates
read. A forced run (`run --force`) adds its run id to both: it trains and evaluates into new dirs.

    qlora-ops deploy --params params/team.yaml   # creates qlora-model-stage/<deployment> on the GPU pool
"""
from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from prefect import flow

from qlora_ops.flows import prefect_tasks as pt
from qlora_ops.flows.device_check import require_cuda
from qlora_ops.flows.stage_timer import StageTimer
from qlora_ops.flows.stages import stage
from qlora_ops.tasks.model import keys
from qlora_ops.tasks.registry import register
from qlora_ops.tasks.registry import tracking
from qlora_ops.tasks.gates import verdict
from qlora_ops.tasks.core.config import Params, SuiteParams
from qlora_ops.tasks.data.prepare import DataError
from qlora_ops.tasks.evaluate.predict import cached_metrics, per_row
from qlora_ops.tasks.core.paths import state_dir, tracking_uri
from qlora_ops.tasks.evaluate.suites import eval_params, hashed, rows_path
from qlora_ops.tasks.core.util import DamagedArtifact, atomic_write_json, read_json, verify_manifest

RESULT = "model_stage.json"
METRIC = "test_accuracy"
TEST = "test"  # the domain test split's name as a suite


@dataclass(frozen=True)
class Suite:
    """One set of rows every model is scored on: the domain test split ("test") or an eval.suites entry."""
    name: str
    rows: Path
    score_key: str
    params: SuiteParams | None = None  # None: the domain split

    @property
    def artifact(self) -> str:  # where its evaluations go on the run
        return "eval" if self.params is None else f"eval/suites/{self.name}"

    @property
    def prefix(self) -> str:  # its evaluations' cache and work dir names
        return "" if self.params is None else f"{self.name}."


def materialize(data_uri: str, dst: Path) -> Path:
    """The prepared data as a local dir: the parent's own dir in-process, else downloaded from MLflow."""
    if Path(data_uri).is_dir():
        return Path(data_uri)
    import mlflow

    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=data_uri, dst_path=str(dst)))


def _checked(path: Path, want: str, what: str) -> Path:
    if (got := keys.rows_hash(path)) != want:
        raise DataError(f"{path}: {what} hash {got} != {want} announced by the parent run; the hand-off is not the "
                        "data that was versioned")
    return path


@flow(name="qlora-model-stage", log_prints=True, persist_result=False)
def model_stage(params: dict, run_id: str, data_uri: str, test_hash: str, workspace: str = ".",
                suites_uri: str | None = None, suite_hashes: dict[str, str] | None = None, force: bool = False) -> dict:
    import mlflow

    p = Params.model_validate(params)
    require_cuda(p)  # on the GPU pool without a GPU: refuse, naming the pool and the image, before any work
    ws = Path(workspace).resolve()
    sd = state_dir(ws, p)
    if mlflow.get_tracking_uri() != (uri := tracking_uri(ws, p)):
        mlflow.set_tracking_uri(uri)
    exp_id = mlflow.tracking.MlflowClient().get_run(run_id).info.experiment_id  # fails fast on a wrong server
    work = sd / "model-stage" / run_id
    prepared = materialize(data_uri, work / "data")
    test_path = _checked(prepared / "test.jsonl", test_hash, "test split")
    suites = suite_specs(p, test_path, materialize(suites_uri, work / "suites") if suites_uri else None,
                         suite_hashes or {})
    nonce = run_id if force else ""  # a forced run trains and evaluates into new dirs (keys.train_key, eval_key)

    timed = StageTimer()
    times = timed.seconds

    base = timed("base_model", stage(pt.resolve_base, p, "base_model"), p, ws)
    # QLoRA's base, quantized once: a QLoRA training then never reads the full-precision file (its peak)
    qbase = timed("quantize_base", stage(pt.quantize_base, p, "base_model"), p, ws, base)
    base_id = keys.content_hash(Path(base))
    train_key = keys.train_key(p, keys.data_hash(prepared), base_id, nonce)

    results = {}
    for kind in ("qlora", "lora"):
        results[kind] = train_checked(timed, p, qbase if kind == "qlora" else base, prepared,
                                      sd / "runs" / f"train-{kind}-{train_key}", kind)
        tracking.log_training(run_id, exp_id, results[kind])
        tracking.log_dir(run_id, Path(results[kind]["adapter_dir"]), f"adapters/{kind}")
    adapters = {k: keys.content_hash(Path(r["adapter_dir"])) for k, r in results.items()}
    # What each evaluation scores, by content: the same bytes are never scored twice, other bytes always are.
    contents = {"base": (base_id,), "lora": (base_id, adapters["lora"]),
                "qlora": (keys.content_hash(Path(qbase)), adapters["qlora"])}
    cache = sd / "cache" / "eval"

    def evaluate(suite: Suite, name: str, model_dir: str, content: tuple[str, ...], out: Path | None = None,
                 **kw) -> tuple[dict, Path]:
        """Scores of one model on one suite: cached under its eval key (`out` given: not cached, a re-check
        of the bytes about to be registered), logged on the run with what was evaluated."""
        ekey = keys.eval_key(suite.score_key, *content, nonce=nonce)
        cached = out is None
        out = out or cache / f"{suite.prefix}{name}-{ekey}"
        if cached and (m := cached_metrics(out)) is not None:
            m = {**m, "cached": True}
        else:
            m = timed(f"eval_{suite.prefix}{name}", run_eval(p, suite), name, model_dir, str(out), **kw)
        atomic_write_json(out / "evaluated.json", {"score_key": suite.score_key, "content": list(content), "eval_key": ekey})
        tracking.log_files(run_id, [out / "predictions.jsonl", out / "metrics.json", out / "evaluated.json"],
                           f"{suite.artifact}/{name}")
        return m, out

    def evaluate_all(name: str, model_dir: str, content: tuple[str, ...], uncached: bool = False, **kw) -> None:
        for s in suites:
            m, d = evaluate(s, name, model_dir, content, work / f"eval-{s.prefix}{name}" if uncached else None, **kw)
            by_suite[s.name]["models"][name] = m
            by_suite[s.name]["rows"][name] = per_row(d)

    by_suite: dict[str, dict] = {s.name: {"models": {}, "rows": {}} for s in suites}
    evaluate_all("base", base, contents["base"])
    evaluate_all("lora", base, contents["lora"], adapter_dir=results["lora"]["adapter_dir"])
    evaluate_all("qlora", qbase, contents["qlora"], adapter_dir=results["qlora"]["adapter_dir"], quantized=True)

    models, rows = by_suite[TEST]["models"], by_suite[TEST]["rows"]
    out = {"models": models, "model_uri": None, "champion": None, "score_key": suites[0].score_key,
           "code": keys.code_version(), "hardware": keys.hardware(), "libraries": keys.lib_versions(),
           "forced": force, "adapter_digests": adapters, "train_key": train_key,
           "worker": {"host": socket.gethostname(), "workspace": str(ws), "pid": os.getpid()},
           "training": {k: {x: r.get(x) for x in ("optimizer", "device", "train_seconds", "peak_mem_bytes",
                                                 "mean_tokens_per_s", "final_val_loss", "resumed_from")}
                        for k, r in results.items()}}
    # Per-row results: every gate and the promotion decision are paired comparisons on these rows.
    out["rows"] = rows
    out["suites"] = {s.name: {"metric": s.params.metric, "role": s.params.role, "threshold": s.params.threshold,
                              "score_key": s.score_key, **by_suite[s.name]} for s in suites[1:]}
    # Merging is only worth doing for a candidate the pre-merge gates accept; the parent decides again.
    if verdict.merge_worthwhile(p, out):
        merged_dir = work / "merged"
        timed("merge", stage(pt.merge_adapter, p, "merge"), p, base, results["qlora"]["adapter_dir"], str(merged_dir), qbase)
        out["merged_digest"] = keys.content_hash(merged_dir)
        evaluate_all("merged", str(merged_dir), (out["merged_digest"],), uncached=True, as_saved=True)
        serving = {"system_prompt": p.data.system_prompt, "max_new_tokens": models["merged"]["max_new_tokens"],
                   "batch_size": p.eval.batch_size}  # served in the batches it was evaluated in
        out["model_uri"] = timed("log_model", stage(pt.log_model, p, "registry"), str(merged_dir), serving, run_id)
        shutil.rmtree(merged_dir, ignore_errors=True)  # the artifact store holds its copy
        champ = timed("champion", champion_results, p, suites, work, cache, nonce)
        if champ is not None:
            out["champion"] = {"version": champ["version"], "how": champ["how"][TEST], **champ["rows"][TEST]}
            for s in suites[1:]:
                out["suites"][s.name]["models"]["champion"] = {**champ["models"][s.name], "version": champ["version"],
                                                               "how": champ["how"][s.name]}
                out["suites"][s.name]["rows"]["champion"] = champ["rows"][s.name]
    out["stage_seconds"] = times
    # MiB per stage, each from its own start; a training ran in its own process: that process's peak
    out["stage_peak_mb"] = {**timed.peak_mb, **{f"train_{k}": round(r["process_peak_bytes"] / 2**20, 1)
                                                for k, r in results.items() if r.get("process_peak_bytes")}}
    tracking.log_json(run_id, out, RESULT)
    return out


def suite_specs(p: Params, test_path: Path, suites_dir: Path | None, hashes: dict[str, str]) -> list[Suite]:
    """The domain split first, then every eval.suites entry, each with its checked rows and its score key."""
    out = [Suite(TEST, test_path, keys.score_key(p, keys.rows_hash(test_path)))]
    for s in p.eval.suites:
        if suites_dir is None or s.name not in hashes:
            raise DataError(f"suite {s.name!r}: the parent run handed over no rows for it; run the parent flow "
                            "(flows/retrain.py), which prepares every suite")
        _checked(hashed(suites_dir, s), hashes[s.name], f"suite {s.name!r}")
        out.append(Suite(s.name, rows_path(suites_dir, s), keys.score_key(p, hashes[s.name], s), s))
    return out


def run_eval(p: Params, suite: Suite):
    """fn(name, model_dir, out_dir, **model kw) evaluating one model on `suite`: the domain split with its
    gate and reported metrics; an extra suite with its own metric and rows; an lm-eval suite by its task."""
    s = suite.params
    if s is None:
        return lambda name, model_dir, out, **kw: stage(pt.evaluate_model, p, "evaluate")(
            p, name, model_dir, str(suite.rows), out, **kw)
    if s.lm_eval is not None:
        return lambda name, model_dir, out, **kw: stage(pt.evaluate_lm_eval, p, "evaluate")(
            p, name, model_dir, str(suite.rows), out, **kw, metrics=[s.metric], system_prompt=s.system_prompt,
            max_examples=s.max_examples, filter_name=s.filter)
    return lambda name, model_dir, out, **kw: stage(pt.evaluate_model, p, "evaluate")(
        eval_params(p, s), name, model_dir, str(suite.rows), out, **kw, metrics=[s.metric])


def train_checked(timed, p: Params, base_dir: str, prepared: Path, out_dir: Path, kind: str) -> dict:
    """Train (or reuse) one adapter and check it against its manifest before anything uses it: a damaged
    one (a finished run's adapter truncated or rewritten on disk) is rebuilt from the run's last sound
    checkpoint, never logged, scored or merged."""
    def run(label: str) -> dict:
        return timed(label, stage(pt.train_adapter, p, "train"), p, base_dir, str(prepared), str(out_dir), kind)

    r = run(f"train_{kind}")
    if (bad := verify_manifest(Path(r["adapter_dir"]))) is None:
        return r
    print(f"[{kind}] the trained adapter {r['adapter_dir']} is damaged ({bad}); rebuilding it")
    (out_dir / "result.json").unlink(missing_ok=True)  # what makes the training reuse the finished run
    shutil.rmtree(r["adapter_dir"], ignore_errors=True)
    r = run(f"train_{kind}_rebuild")
    if (bad := verify_manifest(Path(r["adapter_dir"]))) is not None:
        raise DamagedArtifact(f"[{kind}] the adapter rebuilt in {out_dir} is damaged again ({bad}); the disk under "
                              f"{out_dir} may be failing")
    return r


def champion_results(p: Params, suites: list[Suite], work: Path, cache: Path, nonce: str = "") -> dict | None:
    """The current champion's per-row results on every suite: the predictions its own run saved when they
    were made under the same score key (not on a forced run), else an evaluation here, where the candidate
    was scored (GPU work: never under the parent's registry lock), cached on the champion's content."""
    force = bool(nonce)
    info = register.champion_info(p.registry.model_name, p.registry.champion_alias)
    if info is None:
        return None
    v, tags = info["version"], info["tags"]
    out: dict = {"version": v, "how": {}, "models": {}, "rows": {}}
    local: list[Path] = []

    def model_dir() -> Path:  # downloaded once, when a suite needs it
        if not local:
            local.append(register.download_hf_model(p.registry.model_name, v, work / "champion"))
        return local[0]

    for s in suites:
        tag = "score_key" if s.params is None else f"score_key.{s.name}"
        if not force and tags.get(tag) == s.score_key and tags.get("mlflow_run_id"):
            d = saved_eval(tags["mlflow_run_id"], s, work / "champion-saved" / f"v{v}")
            how = "its own saved predictions (same score key)"
        else:
            content = keys.content_hash(model_dir())
            d = cache / f"{s.prefix}champion-{keys.eval_key(s.score_key, content, nonce=nonce)}"
            if cached_metrics(d) is None:
                run_eval(p, s)("champion", str(model_dir()), str(d), as_saved=True)
            how = f"re-evaluated on these rows ({'forced' if force else 'its saved predictions have another score key'})"
        out["how"][s.name], out["models"][s.name], out["rows"][s.name] = how, read_json(d / "metrics.json"), per_row(d)
    shutil.rmtree(work / "champion", ignore_errors=True)
    return out


def saved_eval(run_id: str, suite: Suite, dst: Path) -> Path:
    """The merged model's saved evaluation on `suite` from the run that registered it."""
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/{suite.artifact}/merged",
                                                    dst_path=str(dst / suite.name)))
