"""`qlora-ops data diff A B` and `qlora-ops data checkout --version N`: the data of registered versions.

A version's data is found through its run (version tag `mlflow_run_id`, else the version's run id): the
run logged the prepared splits as the artifact `data/prepared` and the DVC hash of each stage output as
the tag `dvc.out.<path>` (flows/retrain.py). `diff` compares two versions' `data/prepared`
(tasks/data/diff.py); `checkout` fetches the hash from DVC (tasks/data/checkout.py), checks every file
against DVC's manifest and against the run's MLflow copy, and only then writes the output folder.
Exit 2: no such version, or data that does not match (named file by file); 4: a service did not answer.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from qlora_ops.flows.cli.exit_codes import fail
from qlora_ops.flows.cli.preflight import preflight
from qlora_ops.tasks.core.config import Params
from qlora_ops.tasks.core.paths import state_dir
from qlora_ops.tasks.data.checkout import fetch_dir, mismatches
from qlora_ops.tasks.data.diff import diff_rows, format_diff
from qlora_ops.tasks.data.prepare import DataError

PREPARED = "data/prepared"  # the run artifact holding the prepared splits


def version_run(model_name: str, version: int):
    """(model version, its run); DataError when the version or its run is not in the registry."""
    c = MlflowClient()
    try:
        mv = c.get_model_version(model_name, str(version))
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise DataError(f"{model_name} v{version} is not a registered version (`qlora-ops status` lists them)") from None
    run_id = mv.tags.get("mlflow_run_id") or mv.run_id
    if not run_id:
        raise DataError(f"{model_name} v{version} names no MLflow run (no tag mlflow_run_id): its data is not recorded")
    return mv, c.get_run(run_id)


def download_prepared(run_id: str, dst: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=PREPARED, dst_path=str(dst)))


def prepared_md5(run, params: Params) -> tuple[str, str]:
    """(path, `<md5>.dir`) of the run's prepared output, from its `dvc.out.<path>` tags (params on older runs)."""
    outs = {k.removeprefix("dvc.out."): v for src in (run.data.params, run.data.tags) for k, v in src.items()
            if k.startswith("dvc.out.")}
    want = run.data.params.get("data.prepared") or params.data.prepared
    if want in outs:
        return want, outs[want]
    dirs = {k: v for k, v in outs.items() if str(v).endswith(".dir") and not k.endswith(".lineage.json")}
    if len(dirs) != 1:
        raise DataError(f"run {run.info.run_id}: no single DVC directory output among its dvc.out.* tags "
                        f"({sorted(outs) or 'none'}); its data cannot be checked out by hash")
    return next(iter(dirs.items()))


def diff_command(a) -> int:
    if isinstance(pre := preflight(a), int):
        return pre
    ws, params, uri = pre
    mlflow.set_tracking_uri(uri)
    name = params.registry.model_name
    try:
        sides = [version_run(name, v) for v in (a.a, a.b)]
        with tempfile.TemporaryDirectory(prefix="qlora-ops-diff-") as tmp:
            dirs = [download_prepared(run.info.run_id, Path(tmp) / f"v{mv.version}") for mv, run in sides]
            d = diff_rows(dirs[0], dirs[1], params.data.split.near_dup_threshold, params.data.labels)
    except DataError as e:
        return fail("bad_input", e)
    ends = [{"version": int(mv.version), "run_id": run.info.run_id, "data_version": mv.tags.get("data_version")}
            for mv, run in sides]
    if a.json:
        print(json.dumps({"model": name, "from": ends[0], "to": ends[1], "diff": d}, indent=2, sort_keys=True))
        return 0
    print(f"{name} v{a.a} (data version {ends[0]['data_version']}) -> v{a.b} (data version {ends[1]['data_version']})")
    print("\n".join(format_diff(d)))
    return 0


def checkout_command(a) -> int:
    if isinstance(pre := preflight(a), int):
        return pre
    ws, params, uri = pre
    mlflow.set_tracking_uri(uri)
    name, n = params.registry.model_name, a.version
    out = Path(a.out).resolve() if a.out else state_dir(ws, params).resolve() / "checkout" / f"v{n}"
    if out.exists() and any(out.iterdir()) and a.out:
        return fail("bad_input", DataError(f"--out {out} is not empty: remove it or name another folder"))
    try:
        mv, run = version_run(name, n)
        path, md5 = prepared_md5(run, params)
        with tempfile.TemporaryDirectory(prefix="qlora-ops-checkout-") as tmp:
            got = Path(tmp) / "dvc"
            manifest = fetch_dir(ws, params, md5, got)
            if bad := mismatches(got, manifest):
                raise DataError(f"{name} v{n}: the data DVC delivered for {path} ({md5}) does not match its manifest "
                                "(the cache or the remote was changed): " + "; ".join(bad))
            logged = download_prepared(run.info.run_id, Path(tmp) / "mlflow")
            if bad := mismatches(logged, manifest):
                raise DataError(f"{name} v{n}: the run's MLflow copy (runs:/{run.info.run_id}/{PREPARED}) differs from "
                                f"DVC's {md5}: " + "; ".join(bad))
            if out.exists():  # the default folder: an earlier checkout of this version, replaced
                shutil.rmtree(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(got), str(out))
    except DataError as e:
        return fail("bad_input", e)
    print(f"{name} v{n}: data version {mv.tags.get('data_version', '?')}, {path} = DVC {md5}")
    print(f"{len(manifest)} files, each md5 checked against DVC's manifest and the run's MLflow copy:")
    for e in manifest:
        print(f"  {e['relpath']}  {e['md5']}")
    print(f"-> {out}")
    return 0
