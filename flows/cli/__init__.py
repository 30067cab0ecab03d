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
    qlora-ops data diff 3 4                    # what changed between the data of v3 and v4
    qlora-ops data checkout --version 3        # v3's exact data, fetched by DVC hash and verified
    qlora-ops workspace init DIR               # a workspace of your own (git + DVC, params/, dvc.yaml)

Every command works on the workspace holding the current directory (the nearest folder up with
qlora-ops.yaml, or .dvc/ and params/), like git and dvc, unless --workspace names another.

Every command takes --verbose (third-party warnings, progress bars and Prefect's run-state lines, which
are off by default) and --debug (also the full traceback of a failure, otherwise one paragraph).

Exit codes: 0 registered, or skipped because nothing is new; 1 refused by a gate (nothing registered);
2 bad params or data (the message names the key or file:line); 3 training diverged; 4 a service did not
answer (tracking server, Prefect API), or another run kept the workspace (orchestration.timeouts.workspace);
5 internal error, a stage past its orchestration.timeouts entry, or a full disk (named with the path).

`run` starts Prefect's temporary API server itself when PREFECT_API_URL is unset, as a child that dies
with it (even on kill -9), and holds <workspace>/.qlora-ops/run.lock for the whole run.

This package: main (here) parses (parser.py) and hands over to one module per command family (run,
deploy, registry, data, report, serving); exit_codes.py maps failures to the codes above. Every module
imported here is light (no torch, Prefect or MLflow): each command imports its heavy libraries itself.
"""
from __future__ import annotations

import logging
import os
import sys

from qlora_ops.flows.cli import data, deploy, registry, report, run, serving, workspace
from qlora_ops.flows.cli.exit_codes import classify, fail
from qlora_ops.flows.cli.parser import build_parser
from qlora_ops.flows.runtime import quiet_expected_tracebacks
from qlora_ops.tasks.core import console

COMMANDS = {"run": run.run_command, "deploy": deploy.deploy_command,
            "status": registry.registry_command, "promote": registry.registry_command,
            "rollback": registry.registry_command,
            "init": data.data_command, "check": data.data_command, "drop": data.drop_command, "data": data.data_group_command,
            "report": report.report_command,
            "serve": serving.serving_command, "verify-serving": serving.serving_command,
            "export-gguf": serving.serving_command, "serving-webhook": serving.webhook_command,
            "workspace": workspace.workspace_command}


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
    console.configure(verbose=verbose, debug=debug)
    if not (verbose or debug):
        # Python prints "Exception ignored in ..." plus a traceback for an exception raised inside a GC
        # callback or __del__ (seen: Prefect's stage timeout landing in SQLAlchemy's weakref callback);
        # nothing the user can act on, so it goes to the debug log unless asked for.
        sys.unraisablehook = lambda u: logging.getLogger("qlora_ops").debug(
            "exception ignored in %r: %r", u.object, u.exc_value)
    if not debug:
        quiet_expected_tracebacks()  # exit 2/3/4: one line naming the key or file:line, not a Prefect stack trace


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


def _main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    _quiet_entry_point(verbose=a.verbose, debug=a.debug)
    workspace.resolve(a)  # from any folder inside a workspace, as git and dvc do
    return COMMANDS[a.cmd](a)
