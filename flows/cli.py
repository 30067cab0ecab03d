"""`qlora-ops` command line.

    qlora-ops run                              # the whole loop on params/default.yaml
    qlora-ops run --params params/other.yaml   # another params file (inside the workspace)
    qlora-ops run --force                      # retrain and re-evaluate even if nothing changed (new caches)
    qlora-ops run --workspace /path/to/clone   # a workspace other than the current directory
    qlora-ops deploy --params params/team.yaml # deployments + schedule on the Prefect server (PREFECT_API_URL)
    qlora-ops status                           # champion, challenger, recent versions and runs
    qlora-ops promote 7 [--force --reason TEXT]
    qlora-ops rollback --reason TEXT
    qlora-ops report [RUN_ID]                  # rebuild a run's HTML report + model card from MLflow (default: newest run)
    qlora-ops init data/raw/tickets.csv        # writes params/tickets.yaml for that data (format, labels, test size)
    qlora-ops check --params params/tickets.yaml  # validate params + data, say what a run would do; trains nothing
    qlora-ops drop new.jsonl --params params/team.yaml  # validate, then put into data.source: a run follows

Every command takes --verbose (third-party warnings, progress bars and Prefect's run-state lines, which
are off by default) and --debug (also the full traceback of a failure, otherwise one paragraph).

Exit codes: 0 registered, or skipped because nothing is new; 1 refused by a gate (nothing registered);
2 bad params or data (the message names the key or file:line); 3 training diverged; 4 a service did not
answer (tracking server, Prefect API), or another run kept the workspace (orchestration.timeouts.workspace);
5 internal error, a stage past its orchestration.timeouts entry, or a full disk (named with the path).

`run` starts Prefect's temporary API server itself when PREFECT_API_URL is unset, as a child that dies
with it (even on kill -9), and holds <workspace>/.qlora-ops/run.lock for the whole run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

EXIT = {"registered": 0, "skipped": 0, "rejected": 1, "bad_input": 2, "diverged": 3, "service": 4, "internal": 5,
        "timeout": 5, "disk_full": 5}


def _quiet_entry_point(verbose: bool = False, debug: bool = False) -> None:
    # Entry-point side effects only (nothing at import): no hub at run time, MLflow's client bounded (its
    # defaults retry a dead server for minutes), and the console (tasks.core.console): third-party warnings,
    # progress bars and Prefect's run-state lines off unless --verbose, tracebacks only with --debug.
    # Set before Prefect, transformers or MLflow are imported; child processes inherit the environment.
    for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
                 "TOKENIZERS_PARALLELISM": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                 "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
                 # Prefect's temporary server (no PREFECT_API_URL) migrates a new SQLite file at first start:
                 # its 20 s default was seen to expire on a loaded 2-core machine ("Timed out while attempting
                 # to connect to ephemeral Prefect API server", exit 4 before any work).
                 "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}.items():
        os.environ.setdefault(k, v)
    from qlora_ops.tasks.core import console
    console.configure(verbose=verbose, debug=debug)
    if not (verbose or debug):
        # Python prints "Exception ignored in ..." plus a traceback for an exception raised inside a GC
        # callback or __del__ (seen: Prefect's stage timeout landing in SQLAlchemy's weakref callback);
        # nothing the user can act on, so it goes to the debug log unless asked for.
        import logging
        sys.unraisablehook = lambda u: logging.getLogger("qlora_ops").debug(
            "exception ignored in %r: %r", u.object, u.exc_value)
    from qlora_ops.flows.runtime import quiet_expected_tracebacks
    if not debug:
        quiet_expected_tracebacks()  # exit 2/3/4: one line naming the key or file:line, not a Prefect stack trace


def classify(exc: BaseException) -> str:
    from qlora_ops.flows.remote_stage import ModelStageFailed
    from qlora_ops.flows.runtime import ServiceUnavailable, StageTimedOut, is_transient
    from qlora_ops.tasks.model.base import BaseModelError
    from qlora_ops.tasks.core.config import ParamsError
    from qlora_ops.tasks.data.prepare import DataError
    from qlora_ops.tasks.model.modeling import DivergenceError
    from qlora_ops.tasks.data.versioning import DvcError

    if isinstance(exc, (ParamsError, DataError, DvcError, BaseModelError)) or \
            (isinstance(exc, ModelStageFailed) and "orchestration.gpu_required" in str(exc)):  # no GPU on the GPU pool
        return "bad_input"
    if isinstance(exc, StageTimedOut):
        return "timeout"
    if isinstance(exc, DivergenceError) or (isinstance(exc, ModelStageFailed) and "Diverg" in str(exc)):
        return "diverged"
    # A network fault still there after the stage's retries (DVC remote, data.source, tracking server
    # mid-run) is a service that did not answer, not an internal error.
    from qlora_ops.tasks.core.util import DiskFull
    if isinstance(exc, DiskFull):  # exit 5 like any fault of the machine, but said plainly, with the path
        return "disk_full"
    if isinstance(exc, ServiceUnavailable) or is_transient(exc):
        return "service"
    return "internal"


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("qlora-ops: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # anything not handled below: one paragraph (a traceback only with --debug)
        try:
            kind = classify(e)
        except Exception:  # classify imports the flow modules: they may be what failed
            kind = "internal"
        return fail(kind, e)


def fail(kind: str, exc: BaseException, label: str | None = None) -> int:
    """Say what failed in one paragraph (the full traceback first with --debug); the documented exit code."""
    from qlora_ops.tasks.core import console

    if console.is_debug():
        traceback.print_exception(exc)
    label = label or {"bad_input": "error", "diverged": "training diverged", "service": "service unavailable",
                      "internal": "internal error", "rejected": "refused", "timeout": "timed out",
                      "disk_full": "disk full"}[kind]
    hint = "\n(rerun with --debug for the full traceback)" if kind == "internal" and not console.is_debug() else ""
    print(f"qlora-ops: {label}: {exc}{hint}", file=sys.stderr)
    return EXIT[kind]


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qlora-ops", description="QLoRA retraining loop: DVC -> train -> gates -> merge -> MLflow")
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the full loop")
    run.add_argument("--params", default="params/default.yaml", help="params YAML (default: %(default)s)")
    run.add_argument("--workspace", default=".", help="directory with dvc.yaml, params/ and data/ (default: cwd)")
    run.add_argument("--force", action="store_true", help="retrain both adapters and re-evaluate every model into new caches even when nothing is new "
                     "(same data, params, code, base and libraries); reuses only the verified converted and 4-bit base")
    dep = sub.add_parser("deploy", help="create/update the Prefect deployments and schedule from params")
    st = sub.add_parser("status", help="champion, challenger, recent versions and runs with verdicts")
    pr = sub.add_parser("promote", help="move the champion alias to VERSION (same policy as automatic promotion)")
    pr.add_argument("version", type=int)
    pr.add_argument("--force", action="store_true", help="promote even if the policy says no (needs --reason)")
    pr.add_argument("--reason", help="why: recorded on the version with who did it")
    rb = sub.add_parser("rollback", help="champion back to the version it replaced; the demoted one is rejected")
    rb.add_argument("--reason", required=True)
    ini = sub.add_parser("init", help="write a params file for DATAFILE (format, columns, labels, test size)")
    ini.add_argument("datafile", help="JSONL, CSV, Parquet or .arrow file, or a datasets save_to_disk directory")
    ini.add_argument("--out", help="params file to write, inside the workspace (default: params/<data name>.yaml)")
    ini.add_argument("--workspace", default=".")
    ini.add_argument("--model", help="model.source to write (default: the embedded smollm2-gguf)")
    ini.add_argument("--force", action="store_true", help="replace an existing --out file")
    chk = sub.add_parser("check", help="validate params + data and say what a run would do, without training")
    rep = sub.add_parser("report", help="rebuild a run's HTML report and model card from MLflow")
    rep.add_argument("run_id", nargs="?", help="MLflow run id (default: the newest finished run of the experiment)")
    rep.add_argument("--out", help="directory to write into (default: <state_dir>/reports/<run id>)")
    for p in (dep, st, pr, rb, chk, rep, *add_serving_parsers(sub)):
        p.add_argument("--params", default="params/default.yaml")
        p.add_argument("--workspace", default=".")
    add_drop_parser(sub)
    for p in sub.choices.values():  # every subcommand, whoever added it
        p.add_argument("-v", "--verbose", action="store_true",
                       help="show third-party warnings, progress bars and Prefect's run-state lines")
        p.add_argument("--debug", action="store_true", help="--verbose, and full tracebacks on failure")
    a = ap.parse_args(argv)
    _quiet_entry_point(verbose=a.verbose, debug=a.debug)
    if a.cmd in ("status", "promote", "rollback"):
        return registry_command(a)
    if a.cmd in ("init", "check"):
        return data_command(a)
    if a.cmd == "report":
        return report_command(a)
    if a.cmd in SERVING_COMMANDS:
        return serving_command(a)
    if a.cmd == "drop":
        return drop_command(a)

    if a.cmd == "deploy":
        from qlora_ops.flows.deploy import deploy_file
        try:
            for what, ident in deploy_file(Path(a.workspace) / a.params, Path(a.workspace)).items():
                print(f"{what}: {ident}")
        except Exception as e:
            kind = classify(e)
            print(f"qlora-ops: deploy failed: {e}", file=sys.stderr)
            return EXIT[kind if kind != "internal" else "service"]
        return 0

    from qlora_ops.tasks.core.util import TIE_ENV
    os.environ[TIE_ENV] = "1"  # our own entry points started below us (via DVC too) die with us
    return run_command(a)


def run_command(a) -> int:
    from qlora_ops.flows.runtime import WorkspaceBusy, temporary_prefect_server, workspace_run_lock

    # Before any work (no lock file yet): a bad key, a dead tracking server or Prefect API, in seconds.
    if isinstance(pre := preflight(a), int):
        return pre
    ws, params, uri = pre
    from qlora_ops.flows.registry_slot import RegistryLockUnavailable, check_writer
    try:  # a shared registry's writer needs the team's Prefect API: refused now, not after training
        check_writer(uri, params.registry.model_name)
    except RegistryLockUnavailable as e:
        return fail("service", e)
    # One run per workspace, taken before the slow start (imports, the Prefect server): a second run
    # says at once which pid it waits for, and refuses after orchestration.timeouts.workspace.
    try:
        with workspace_run_lock(ws, params.orchestration.timeouts.workspace):
            with temporary_prefect_server() as api:  # our child: it dies with us, even on kill -9
                return run_locked(a, api)
    except WorkspaceBusy as e:
        return fail("service", e, label="workspace busy")


def run_locked(a, api: str | None) -> int:
    from qlora_ops.flows.retrain import retrain  # Prefect is imported here, after PREFECT_API_URL points at `api`
    from qlora_ops.flows.runtime import ServiceUnavailable, wait_prefect_server
    try:
        wait_prefect_server(api)
    except ServiceUnavailable as e:
        return fail("service", e)
    state = retrain(params_path=a.params, workspace=a.workspace, force=a.force, return_state=True)
    if state.name == "Rejected":
        return EXIT["rejected"]
    if state.is_completed():
        return EXIT["registered"]
    exc = state.result(raise_on_failure=False)
    exc = exc if isinstance(exc, BaseException) else RuntimeError(state.message)
    return fail(classify(exc), exc)


def preflight(a):
    """(workspace, params, tracking URI), or the exit code after one clear line: a bad params file, or a
    service that does not answer (the tracking server, the Prefect API)."""
    from qlora_ops.flows.runtime import ServiceUnavailable, check_services
    from qlora_ops.tasks.core.config import ParamsError, load_params
    from qlora_ops.tasks.core.paths import tracking_uri, ws_path

    ws = Path(a.workspace).resolve()
    try:
        params = load_params(ws_path(ws, a.params))
        uri = tracking_uri(ws, params)
        check_services(uri, os.environ.get("PREFECT_API_URL"))
    except ParamsError as e:
        return fail("bad_input", e)
    except ServiceUnavailable as e:
        return fail("service", e)
    return ws, params, uri


def data_command(a) -> int:
    """`init` and `check`: plain functions in tasks/, exit 2 with the named error on bad params or data."""
    from qlora_ops.tasks.core.config import ParamsError
    from qlora_ops.tasks.data.prepare import DataError

    try:
        if a.cmd == "init":
            from qlora_ops.tasks.intake.init_params import write_params
            res = write_params(Path(a.datafile), Path(a.workspace), out=a.out, model=a.model, force=a.force,
                               command=" ".join(["qlora-ops", *sys.argv[1:]]) if sys.argv[1:2] == ["init"] else None)
            print(f"wrote {res['path']}: {res['format']}, {res['stats']['rows_after_dedupe']} distinct rows"
                  + (f", labels {', '.join(res['labels'])}" if res["labels"] else ", free-text answers"))
            print(f"  {res['note']}")
            print(f"next: qlora-ops check --params {res['path']}   then   qlora-ops run --params {res['path']}")
        else:
            from qlora_ops.tasks.intake.check import check, format_check
            print(format_check(check(Path(a.params), Path(a.workspace))))
    except (ParamsError, DataError) as e:
        return fail("bad_input", e)
    return 0


def report_command(a) -> int:
    """`report [RUN_ID]`: the run's report and model card rebuilt from its MLflow record alone."""
    import mlflow

    from qlora_ops.tasks.report import html as report
    from qlora_ops.tasks.core.paths import state_dir

    if isinstance(pre := preflight(a), int):
        return pre
    ws, params, uri = pre
    mlflow.set_tracking_uri(uri)
    try:
        run_id = a.run_id or report.newest_run(params.registry.experiment)
        path = report.build_report(run_id, Path(a.out) if a.out else state_dir(ws, params) / "reports" / run_id)
    except report.ReportError as e:
        return fail("bad_input", e)
    print(f"report: {path}")
    if path.with_name("MODEL_CARD.md").is_file():
        print(f"model card: {path.with_name('MODEL_CARD.md')}")
    return 0


def add_drop_parser(sub) -> None:
    d = sub.add_parser("drop", help="validate a data file and put it into data.source; the drop triggers a run")
    d.add_argument("file", help="a .jsonl, .csv, .parquet or .arrow file in one of the row shapes of `check`")
    d.add_argument("--params", default="params/default.yaml", help="params whose data.source receives the file")
    d.add_argument("--workspace", default=".")


def drop_command(a) -> int:
    """`drop FILE`: exit 2 (file:line) on a bad file or params, 4 when the bucket or the Prefect API did not
    answer (the message says whether the file is in place)."""
    from qlora_ops.flows.drop import DropNotAnnounced, drop
    from qlora_ops.flows.events import EventsUnavailable
    from qlora_ops.tasks.core.config import ParamsError, load_params
    from qlora_ops.tasks.data.prepare import DataError
    from qlora_ops.tasks.core.paths import ws_path

    ws = Path(a.workspace).resolve()
    try:
        params = load_params(ws_path(ws, a.params))
        res = drop(Path(a.file), params, ws)
    except (ParamsError, DataError) as e:
        return fail("bad_input", e)
    except DropNotAnnounced as e:
        return fail("service", e, label="dropped, not announced")
    except (ConnectionError, EventsUnavailable) as e:
        return fail("service", e)
    o = params.orchestration
    print(f"dropped {Path(a.file).name}: {res['rows']} valid rows ({res['format']}) -> {res['url']}")
    when = f"qlora-retrain/{o.deployment} starts {o.debounce_s:g} s after the last drop (orchestration.debounce_s)"
    if res["event"] is not None:
        print(f"event {res['event']['event']} sent to the Prefect API: {when}")
    elif "://" in res["url"]:
        print(f"the bucket's notification reaches Prefect through the relay: {when}")
    else:
        print(f"no event sent (PREFECT_API_URL is not set): `qlora-ops run --params {a.params}` retrains now, "
              "or the next scheduled run does")
    return 0


def registry_command(a) -> int:
    import mlflow

    from qlora_ops.flows.registry_slot import RegistryLockUnavailable, registry_writer
    from qlora_ops.tasks.registry import manual as registry_ops
    from qlora_ops.tasks.core.paths import state_dir
    from qlora_ops.tasks.registry.register import PromotionError, registry_lock

    if isinstance(pre := preflight(a), int):
        return pre
    ws, params, uri = pre
    mlflow.set_tracking_uri(uri)
    r = params.registry
    if a.cmd == "status":
        from qlora_ops.tasks.serving.server import SERVING_ALIAS  # moved by verify-serving / serve --follow on a pass

        print(registry_ops.format_status(registry_ops.status(r.model_name, (r.champion_alias, r.challenger_alias,
                                                                            SERVING_ALIAS), r.experiment)))
        return 0
    from qlora_ops.tasks.gates.stats import PromotionPolicy  # not flows.retrain: that imports torch, seconds for nothing here
    # The same serialization as automatic promotion (flows.registry_slot): the model's global slot, which a
    # shared tracking server requires (refused without it), and the workspace's file lock.
    try:
        by = registry_ops.whoami(uri)  # recorded on the version: the user the tracking server authenticated
        with registry_writer(uri, r.model_name, params.orchestration.timeouts.registry), \
                registry_lock(state_dir(ws, params) / "registry.lock"):
            if a.cmd == "promote":
                res = registry_ops.promote(r.model_name, a.version, r.champion_alias, PromotionPolicy.from_registry(r),
                                           state_dir(ws, params) / "promote", force=a.force, reason=a.reason, by=by)
            else:
                res = registry_ops.rollback(r.model_name, r.champion_alias, reason=a.reason, by=by)
    except PromotionError as e:
        print(f"qlora-ops: refused: {e}", file=sys.stderr)
        return EXIT["rejected"]
    except RegistryLockUnavailable as e:
        return fail("service", e)
    if a.cmd == "promote":
        print(f"{'promoted' if res['promoted'] else 'not promoted'}: v{res['version']} ({res['reason']})"
              + (f"; recorded as done by {by.user} ({by.auth})" if res["promoted"] else ""))
        return 0 if res["promoted"] else EXIT["rejected"]
    print(f"rolled back: '{r.champion_alias}' -> v{res['champion']}; v{res['demoted']} tagged rejected ({res['reason']}); "
          f"recorded as done by {by.user} ({by.auth})")
    return 0


# ---------------------------------------------------------------- serve, verify-serving, export-gguf
SERVING_COMMANDS = ("serve", "verify-serving", "export-gguf")


def add_serving_parsers(sub) -> list:
    sv = sub.add_parser("serve", help="serve a registered version over HTTP (MLflow scoring server), its bytes checked "
                                      "against the version's weights_digest")
    sv.add_argument("--port", type=int, default=5001, help="(default: %(default)s)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    sv.add_argument("--dtype", help="serve in this torch dtype instead of the evaluated one (e.g. bfloat16); "
                                    "verify-serving then says whether the answers still match")
    sv.add_argument("--openai", action="store_true",
                    help="serve the version's exported GGUF (export-gguf) with llama-cpp-python's OpenAI-compatible "
                         "server (/v1/chat/completions; the `gguf` extra) instead of MLflow's scoring server")
    sv.add_argument("--gguf", choices=("f16", "q8_0"), default="f16", help="--openai: which GGUF (default: %(default)s)")
    sv.add_argument("--follow", action="store_true",
                    help="serve the 'serving' alias and follow it: receive MLflow's webhook when the champion "
                         "moves, check the new champion's parity, move 'serving' and restart on it "
                         "(secret: $QLORA_OPS_WEBHOOK_SECRET)")
    sv.add_argument("--hook-port", type=int, default=5002, help="--follow: the webhook receiver's port (default: %(default)s)")
    sv.add_argument("--hook-url", help="--follow: the URL MLflow calls (default: http://HOST:HOOK_PORT/)")
    vs = sub.add_parser("verify-serving", help="replay VERSION's test rows through a live endpoint and compare with "
                                               "the evaluated answers; only a pass moves the 'serving' alias")
    vs.add_argument("url", help="the endpoint's base URL, e.g. http://127.0.0.1:5001")
    eg = sub.add_parser("export-gguf", help="write VERSION as GGUF (f16, q8_0, with its chat template) and its LoRA "
                                            "adapter as a GGUF adapter, logged on its run")
    eg.add_argument("--out", help="also keep the files in this directory")
    eg.add_argument("--no-parity", action="store_true", help="skip the llama.cpp parity run (llama-cpp-python)")
    for p, need in ((sv, False), (vs, True), (eg, False)):
        g = p.add_mutually_exclusive_group(required=need)
        g.add_argument("--version", type=int, help="registered version number")
        if p is not vs:
            g.add_argument("--alias", help="or the version holding this alias (default: the champion alias)")
    return [sv, vs, eg]


def serving_command(a) -> int:
    """`serve`, `verify-serving`, `export-gguf`: exit 0 done (check passed), 1 check failed, 2 a version that
    cannot be served or checked (named), 4 the tracking server or the endpoint did not answer."""
    import mlflow

    from qlora_ops.tasks.serving import server as so
    from qlora_ops.tasks.serving.gguf import GGUFExportError
    from qlora_ops.tasks.core.paths import state_dir
    from qlora_ops.tasks.registry.register import PromotionError

    if isinstance(pre := preflight(a), int):
        return pre
    ws, params, uri = pre
    mlflow.set_tracking_uri(uri)
    r, work = params.registry, state_dir(ws, params) / "serving"
    try:
        v = so.resolve_version(r.model_name, a.version, getattr(a, "alias", None) or r.champion_alias)
        if a.cmd == "verify-serving":
            res = so.verify_serving(a.url, r.model_name, v, params.gates.max_serving_disagreement,
                                    params.gates.confidence, work / f"verify-v{v}")
            print(so.explain(res))
            print(f"'{res['alias']}' -> v{v}" if res["alias_moved"] else f"'{res['alias']}' not moved")
            refresh_report(ws, params, res["run_id"], r.model_name, v)
            return 0 if res["passed"] else EXIT["rejected"]
        if a.cmd == "export-gguf":
            from qlora_ops.tasks.serving import gguf as gguf_export
            res = gguf_export.export_version(r.model_name, v, work / f"gguf-v{v}", out=Path(a.out) if a.out else None,
                                             run_parity=not a.no_parity, confidence=params.gates.confidence)
            print(gguf_export.explain(res))
            refresh_report(ws, params, res["run_id"], r.model_name, v)
            return 0
        if getattr(a, "follow", False):
            return serve_follow(so, a, params, work)
        if getattr(a, "openai", False):
            return serve_openai(so, so.fetch_gguf(r.model_name, v, a.gguf, work / f"gguf-v{v}"), a, r.model_name, v)
        local, digest = so.fetch_model(r.model_name, v, work / f"v{v}")
    except so.EndpointUnavailable as e:
        return fail("service", e)
    except (so.ServingError, GGUFExportError, PromotionError) as e:  # PromotionError: refused bytes (download_hf_model)
        return fail("bad_input", e)
    proc = start_server(so, local, digest, a, r.model_name, v)
    if isinstance(proc, int):
        return proc
    try:
        return proc.wait()
    finally:
        so.stop(proc)


def refresh_report(ws: Path, params, run_id: str, model_name: str, v: int) -> None:
    """The run's report and the version's card rebuilt with what was just recorded (served metric and
    agreement, GGUF agreement); a failure is one warning line: the check's result is already recorded."""
    from mlflow.tracking import MlflowClient

    from qlora_ops.tasks.report import html as report
    from qlora_ops.tasks.core.paths import state_dir

    try:
        path = report.publish(run_id, state_dir(ws, params) / "reports" / run_id, model_name, v)
        if (card := path.with_name("MODEL_CARD.md")).is_file():
            MlflowClient().update_model_version(model_name, str(v), description=card.read_text()[:report.CARD_LIMIT])
        print(f"report: {path}")
    except Exception as e:
        print(f"warning: report not rebuilt ({type(e).__name__}: {str(e)[:200]}); `qlora-ops report {run_id}` rebuilds it")


def _show_new(receiver, shown: tuple[int, int], so) -> tuple[int, int]:
    """Print the receiver's checks and errors not printed yet; returns how many of each are printed."""
    for res in receiver.handled[shown[0]:]:
        print(so.explain(res) + f"\n'{res['alias']}' {'-> v' + str(res['version']) if res['alias_moved'] else 'not moved'}",
              flush=True)
    for err in receiver.errors[shown[1]:]:
        print(f"qlora-ops: webhook: {err}", file=sys.stderr, flush=True)
    return len(receiver.handled), len(receiver.errors)


def start_server(so, local: Path, digest: str, a, name: str, v: int):
    """The scoring server of a checked local copy, ready; or the exit code after one line naming why not."""
    from qlora_ops.tasks.core.util import popen_child

    proc = popen_child(so.server_command(local, a.host, a.port), env=so.server_env(digest, a.dtype),
                       start_new_session=True)
    url = f"http://{a.host}:{a.port}"
    try:
        so.wait_ready(url, proc, timeout=600)
    except so.ServingError as e:
        so.stop(proc)
        return fail("bad_input", e)
    print(f"serving {name} v{v} at {url}/invocations (weights {digest[:16]}..., {a.dtype or 'evaluated dtype'})\n"
          f"check it: qlora-ops verify-serving {url} --version {v}", flush=True)
    return proc


def serve_openai(so, gguf: Path, a, name: str, v: int) -> int:
    from qlora_ops.tasks.core.util import popen_child

    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as e:
        return fail("bad_input", RuntimeError(f"--openai needs llama-cpp-python's server: pip install 'qlora-ops[gguf]' ({e})"))
    proc = popen_child(so.openai_server_command(gguf, a.host, a.port), start_new_session=True)
    url = f"http://{a.host}:{a.port}"
    try:
        deadline = time.time() + 600
        while so.is_openai(url, timeout=2) is None:
            if proc.poll() is not None or time.time() > deadline:
                return fail("bad_input", RuntimeError(f"llama_cpp.server for {gguf.name} did not come up at {url}"))
            time.sleep(0.5)
        print(f"serving {name} v{v} ({gguf.name}) at {url}/v1/chat/completions\n"
              f"check it: qlora-ops verify-serving {url} --version {v}", flush=True)
        return proc.wait()
    finally:
        so.stop(proc)


def serve_follow(so, a, params, work: Path) -> int:
    """`serve --follow`: serve the version holding 'serving' and restart on each version a champion webhook
    moves it to (tasks.serving.webhook). With no 'serving' yet, the champion is checked first."""
    import queue

    from mlflow.tracking import MlflowClient

    from qlora_ops.tasks.serving import webhook

    r, g = params.registry, params.gates
    secret = os.environ.get(webhook.SECRET_ENV, "")
    if not secret:
        return fail("bad_input", ValueError(f"--follow needs the webhook secret in ${webhook.SECRET_ENV}"))
    moved: queue.Queue = queue.Queue()
    check = webhook.champion_checker(r.model_name, r.champion_alias, threshold=g.max_serving_disagreement,
                                     confidence=g.confidence, work=work / "follow",
                                     on_serving=lambda v, local, digest: moved.put((v, local, digest)))
    try:
        v = int(MlflowClient().get_model_version_by_alias(r.model_name, so.SERVING_ALIAS).version)
        moved.put((v, *so.fetch_model(r.model_name, v, work / f"v{v}")))
    except so.ServingError:
        raise
    except Exception:  # no 'serving' yet: the champion earns it by a passed check
        res = check(r.model_name, r.champion_alias, so.resolve_version(r.model_name, alias=r.champion_alias))
        print(so.explain(res), flush=True)
        if not res["alias_moved"]:
            return EXIT["rejected"]
    receiver = webhook.Receiver(secret, check, port=a.hook_port, host=a.host)
    with receiver:
        hook = webhook.ensure_webhook(MlflowClient(), a.hook_url or receiver.url, secret, r.model_name)
        print(f"following {r.model_name}@{r.champion_alias}: MLflow webhook {hook.webhook_id} -> "
              f"{a.hook_url or receiver.url}", flush=True)
        proc, shown = None, (0, 0)
        try:
            while True:
                try:
                    v, local, digest = moved.get(timeout=1)
                except queue.Empty:
                    if proc is not None and proc.poll() is not None:
                        return proc.returncode or EXIT["internal"]
                    shown = _show_new(receiver, shown, so)
                    continue
                shown = _show_new(receiver, shown, so)
                if proc is not None:
                    so.stop(proc)  # the port is taken until the old server is gone: a restart costs one model load
                proc = start_server(so, local, digest, a, r.model_name, v)
                if isinstance(proc, int):
                    return proc
        finally:
            if proc is not None and not isinstance(proc, int):
                so.stop(proc)


if __name__ == "__main__":
    sys.exit(main())
