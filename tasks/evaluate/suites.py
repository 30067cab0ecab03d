"""Extra evaluation suites (eval.suites): checked before any work, their rows prepared by the parent flow.

The domain test split is the implicit suite "test". Every other suite is a file of rows read exactly like
data.raw (tasks.data.prepare.prepared_rows: the same formats, row shapes and file:line errors), written in the
prepared splits' shape {id, system, prompt, completion} into one content-addressed directory. The parent
logs that directory on the run (artifact `data/suites`) and hands it to the model stage as it hands the
prepared data, with each suite's rows hash: the model stage checks them, the run fingerprint covers them
(a changed suite is a new decision), and the run's tags `qlora_ops.suite.<name>` record them, so a run is
traceable to the exact rows each suite was judged on. (Not DVC-tracked: suites are small and their exact
rows travel with every run that used them.)
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from qlora_ops.tasks.core.config import DataParams, Params, ParamsError, SuiteParams
from qlora_ops.tasks.core.paths import state_dir, ws_path
from qlora_ops.tasks.data.prepare import prepared_rows
from qlora_ops.tasks.evaluate import lm_eval_suite
from qlora_ops.tasks.core.util import atomic_dir, verify_manifest
from qlora_ops.tasks.model.keys import digest, rows_hash

__all__ = ["check", "data_params", "eval_params", "hashed", "prepare", "row_counts", "rows_file", "rows_path"]


def rows_file(suites_dir: Path, name: str) -> Path:
    return Path(suites_dir) / f"{name}.jsonl"


def check(params: Params, workspace: Path, params_file: Path) -> None:
    """Every suite's source exists (ParamsError naming file, key and fix), before any work."""
    for i, s in enumerate(params.eval.suites):
        key = f"{params_file}: eval.suites[{i}] ({s.name})"
        if s.lm_eval is not None:
            if not ws_path(workspace, s.lm_eval).is_file():
                raise ParamsError(f"{key}.lm_eval={s.lm_eval!r}: no such task YAML (relative paths are relative to the "
                                  f"workspace {workspace}); point it at a local lm-eval task file, or remove the suite")
            try:  # the harness installed, the YAML valid and local, its metric and filter ones the task gives
                lm_eval_suite.check_task(ws_path(workspace, s.lm_eval), s.metric, s.filter)
            except lm_eval_suite.SuiteError as e:
                raise lm_eval_suite.SuiteError(f"{key}.lm_eval: {e}") from None
            continue
        p = ws_path(workspace, s.path)
        if not p.exists():
            raise ParamsError(f"{key}.path={s.path!r}: no such file or directory (relative paths are relative to the "
                              f"workspace {workspace}); point it at a JSONL/CSV/Parquet file of alpaca, chat or "
                              "prompt/completion rows, or remove the suite")


def rows_path(suites_dir: Path, s: SuiteParams) -> Path:
    """What a suite's evaluation reads in a prepared suites dir: its rows file, or its lm-eval task YAML
    inside the copy of the YAML's folder (the task's local data files travel with it)."""
    if s.lm_eval is None:
        return rows_file(suites_dir, s.name)
    return Path(suites_dir) / s.name / Path(s.lm_eval).name


def hashed(suites_dir: Path, s: SuiteParams) -> Path:
    """The file or folder whose hash stands for a suite's rows (keys.rows_hash)."""
    return rows_file(suites_dir, s.name) if s.lm_eval is None else Path(suites_dir) / s.name


def data_params(params: Params, s: SuiteParams) -> DataParams:
    """How a suite's rows are read: the data section's rules, with the suite's own columns and system prompt."""
    d = params.data
    return DataParams(format="auto", columns=d.columns if s.columns is None else s.columns, labels=None,
                      max_input_chars=d.max_input_chars, system_prompt=s.system_prompt or d.system_prompt)


def prepare(params: Params, workspace: Path) -> tuple[Path | None, dict[str, str]]:
    """(directory of <name>.jsonl, {name: rows hash}) for every suite; (None, {}) when there is none.
    Raises DataError naming file:line for a bad row, before any training."""

    if not params.eval.suites:
        return None, {}

    texts, folders, hashes = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="qlora-ops-suites-") as staging:
        for s in params.eval.suites:
            if s.lm_eval is not None:  # every file the task reads, staged: the copy's hash is the suite's
                folders[s.name] = lm_eval_suite.stage_task(ws_path(workspace, s.lm_eval), Path(staging) / s.name)
                hashes[s.name] = rows_hash(folders[s.name])
                continue
            rows = prepared_rows(ws_path(workspace, s.path), data_params(params, s), limit=s.max_examples)
            texts[s.name] = "".join(json.dumps(r) + "\n" for r in rows)
            hashes[s.name] = hashlib.sha256(texts[s.name].encode()).hexdigest()[:16]  # = keys.rows_hash(its file)
        out = state_dir(workspace, params) / "suites" / digest(hashes)
        if out.is_dir() and verify_manifest(out) is None:
            return out, hashes
        with atomic_dir(out) as tmp:
            for n, t in texts.items():
                rows_file(tmp, n).write_text(t)
            for n, d in folders.items():
                shutil.copytree(d, tmp / n)
    return out, hashes


def row_counts(params: Params, suites_dir: Path | None) -> dict[str, int | None]:
    """Each prepared suite's rows (lm-eval suites: their max_examples, or None until the harness loads them),
    for tasks.gates.sizing before any training."""
    out: dict[str, int | None] = {}
    for s in params.eval.suites:
        f = rows_file(suites_dir, s.name) if suites_dir is not None and s.lm_eval is None else None
        out[s.name] = sum(1 for _ in f.open()) if f is not None and f.is_file() else s.max_examples
    return out


def eval_params(params: Params, s: SuiteParams | None) -> Params:
    """The params one suite is evaluated with: the domain split's own (s None), else the eval section with
    the suite's rows already cut to its max_examples (at prepare) and its metric."""
    if s is None:
        return params
    return params.model_copy(update={"eval": params.eval.model_copy(update={"max_examples": None})})
