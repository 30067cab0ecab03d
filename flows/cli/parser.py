"""The `qlora-ops` argument parser: every command and option with its help text (the commands themselves
are in the sibling modules, one per family)."""
from __future__ import annotations

import argparse

from qlora_ops.flows.cli.workspace import add_workspace_parser


def build_parser() -> argparse.ArgumentParser:
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
    ini.add_argument("--no-base-eval", action="store_true",
                     help="do not measure the base model on the validation rows (the metric's fixed gain bar is written)")
    chk = sub.add_parser("check", help="validate params + data and say what a run would do, without training")
    rep = sub.add_parser("report", help="rebuild a run's HTML report and model card from MLflow")
    rep.add_argument("run_id", nargs="?", help="MLflow run id (default: the newest finished run of the experiment)")
    rep.add_argument("--out", help="directory to write into (default: <state_dir>/reports/<run id>)")
    for p in (dep, st, pr, rb, chk, rep, *add_serving_parsers(sub)):
        p.add_argument("--params", default="params/default.yaml")
        p.add_argument("--workspace", default=".")
    add_drop_parser(sub)
    add_data_parser(sub)
    add_workspace_parser(sub)
    for p in sub.choices.values():  # every subcommand, whoever added it
        p.add_argument("-v", "--verbose", action="store_true",
                       help="show third-party warnings, progress bars and Prefect's run-state lines")
        p.add_argument("--debug", action="store_true", help="--verbose, and full tracebacks on failure")
    return ap


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
    sv.add_argument("--create-webhook", action="store_true",
                    help="--follow: also create/update MLflow's webhook (needs the MLflow admin login; else an admin "
                         "runs `qlora-ops serving-webhook --url URL` once and the follower needs only the secret)")
    vs = sub.add_parser("verify-serving", help="replay VERSION's test rows through a live endpoint and compare with "
                                               "the evaluated answers; only a pass moves the 'serving' alias")
    vs.add_argument("url", help="the endpoint's base URL, e.g. http://127.0.0.1:5001")
    eg = sub.add_parser("export-gguf", help="write VERSION as GGUF (f16, q8_0, with its chat template) and its LoRA "
                                            "adapter as a GGUF adapter, logged on its run")
    eg.add_argument("--out", help="also keep the files in this directory")
    eg.add_argument("--no-parity", action="store_true", help="skip the llama.cpp parity run (llama-cpp-python)")
    eg.add_argument("--allow-unverified-legacy", action="store_true",
                    help="export a version registered without weights_digest/adapter_digest (nothing to check its "
                         "bytes against); the output and the tag gguf_unverified say so")
    wh = sub.add_parser("serving-webhook", help="(an MLflow admin, once) create or update the registry webhook `serve "
                        "--follow` receives: MLflow calls URL, signed with $QLORA_OPS_WEBHOOK_SECRET, when the champion moves")
    wh.add_argument("--url", required=True, help="the URL MLflow calls: the follower's receiver, e.g. http://serving:5002/")
    for p, need in ((sv, False), (vs, True), (eg, False)):
        g = p.add_mutually_exclusive_group(required=need)
        g.add_argument("--version", type=int, help="registered version number")
        if p is not vs:
            g.add_argument("--alias", help="or the version holding this alias (default: the champion alias)")
    return [sv, vs, eg, wh]


def add_data_parser(sub) -> None:
    d = sub.add_parser("data", help="the test-set lineage (tasks/data/lineage.py); diff and checkout of "
                       "registered versions' data")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    n = dsub.add_parser("new-lineage", help="start a new test-set lineage: apply a changed split setting "
                        "(split.seed/test/val, max_input_chars); test pins restart, rows ever trained on stay out of test")
    n.add_argument("--params", default="params/default.yaml")
    n.add_argument("--workspace", default=".")
    n.add_argument("--reason", default="", help="why, recorded in the lineage file")
    df = dsub.add_parser("diff", help="what changed between the data of two registered versions: rows added, removed, "
                         "edited; label and length shift (from each version's run, artifact data/prepared)")
    df.add_argument("a", type=int, help="registered version number (the older side)")
    df.add_argument("b", type=int, help="registered version number (the newer side)")
    df.add_argument("--json", action="store_true", help="the diff as JSON")
    co = dsub.add_parser("checkout", help="the exact prepared data of a registered version, fetched by its DVC hash and "
                         "verified file by file against DVC's manifest and the run's MLflow copy")
    co.add_argument("--version", type=int, required=True, help="registered version number")
    co.add_argument("--out", help="folder to write, new or empty (default: <state_dir>/checkout/v<VERSION>)")
    for p in (df, co):
        p.add_argument("--params", default="params/default.yaml")
        p.add_argument("--workspace", default=".")


def add_drop_parser(sub) -> None:
    d = sub.add_parser("drop", help="validate a data file and put it into data.source; the drop triggers a run")
    d.add_argument("file", help="a .jsonl, .csv, .parquet or .arrow file in one of the row shapes of `check`")
    d.add_argument("--params", default="params/default.yaml", help="params whose data.source receives the file")
    d.add_argument("--workspace", default=".")
