"""A suite from lm-evaluation-harness: run a local task YAML on an already-loaded model, save per-row results.

    evaluate_suite(params, "qlora", base_dir, Path("suites/arc_mini.yaml"), out_dir, adapter_dir, quantized=True,
                   metrics=["exact_match"])

The harness (`pip install 'qlora-ops[suites]'`, the `lm-eval` package) runs the task exactly as its YAML
says (prompt template, few-shot, answer extraction) on the model we loaded: base, LoRA, 4-bit QLoRA +
adapter or merged (its HFLM takes a model instance). Its data must be local: the YAML's
`dataset_kwargs.data_files` (and a `dataset_path` directory) are read relative to the YAML's folder, so
the suite runs offline. `!function` helpers in the YAML are the user's own Python, loaded as the
harness does. Prompts go through the tokenizer's chat template with the suite's system prompt, as the
tuned models were trained.

The harness's per-sample log becomes the same files tasks.evaluate.predict writes (predictions.jsonl,
metrics.json), one row per document in document order, so the paired statistics treat a suite like
the domain test split: our metrics (tasks.metrics) are computed on the answer and reference texts
(`generate_until`: the generated answer vs the target; `multiple_choice`: the choice the model ranks
first vs the gold choice, so exact_match there is the harness's `acc`), and the harness's own per-sample
metrics are kept beside them as `lm_eval.<name>`, and a suite may be gated on one of them (`metric:
lm_eval.acc_norm`; tasks.metrics.HARNESS). A task with several filters (GSM8K's strict-match and
flexible-extract) logs one sample per filter and document: the suite keeps ONE filter, the suite's
`filter` or else the task's first, so every document is one row. A target that is a list of acceptable
answers keeps them all: each row scores its best match.

Every file the task reads is local and travels with the run: `stage_task` copies the YAML's folder, and
the data files outside it (absolute paths too) into `_external/` of the copy, with a marker naming the
YAML, so the copy's hash (keys.rows_hash) changes with any file the task reads and differs between two
suites of one folder. `check_task` refuses, before any work and naming the file and the fix: a missing
harness, malformed YAML, a hub dataset, an unknown filter and a metric the task's output type cannot give.
"""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
import time
from pathlib import Path

from qlora_ops.tasks import metrics as M
from qlora_ops.tasks.core.config import ParamsError
from qlora_ops.tasks.core.util import atomic_write_json, atomic_write_text

OUTPUT_TYPES = ("generate_until", "multiple_choice")
# datasets' packaged builders that read local data_files; any other dataset_path that is not a local
# directory is a hub dataset, which an offline suite cannot read.
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
EXTERNAL = "_external"  # in a staged copy: the task's files from outside its folder, mapped by files.json
MARKER = "_suite.json"  # in a staged copy: which YAML of the folder is the suite's
# The harness's own metrics by the output type that gives them (tasks.metrics.HARNESS).
HARNESS_BY_TYPE = {"multiple_choice": ("acc", "acc_norm", "acc_mutual_info"), "generate_until": ("exact_match",)}


class SuiteError(ParamsError):
    """A task YAML the suite runner cannot use: the message names the file and the fix. Bad input, so the
    CLI exits 2 (a ParamsError), never 5 (internal)."""


def _read_yaml(path: Path) -> dict:
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:
        raise SuiteError(f"{path}: lm-eval suites need the lm-evaluation-harness (the `lm_eval` package): "
                         "pip install 'qlora-ops[suites]'") from None
    if not path.is_file():
        raise SuiteError(f"{path}: task YAML not found; point the suite's lm_eval at a local lm-eval task file")
    try:
        cfg = load_yaml(path)
    except Exception as e:  # yaml's parser and scanner errors, a bad !function: the user's file
        raise SuiteError(f"{path}: not a valid lm-eval task YAML ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         "fix the YAML (see lm-eval's docs/task_guide.md)") from None
    if not isinstance(cfg, dict):
        raise SuiteError(f"{path}: a task YAML is a mapping of keys (task, dataset_path, ...), not {type(cfg).__name__}")
    return cfg


def _files_as_written(cfg: dict) -> list[str]:
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files is None:
        return []
    vals = files.values() if isinstance(files, dict) else [files]
    return [str(x) for v in vals for x in (v if isinstance(v, list) else [v])]


def load_task(task_yaml: Path) -> dict:
    """The task config as the harness reads it, with its local data paths made absolute (in a staged copy,
    the copies of the files from outside its folder)."""
    path = Path(task_yaml).resolve()
    cfg = _read_yaml(path)
    if "task" not in cfg or "group" in cfg:
        raise SuiteError(f"{task_yaml}: one task per suite (a `task:` name, not a group); write one YAML per task")
    if cfg.get("output_type", "generate_until") not in OUTPUT_TYPES:
        raise SuiteError(f"{task_yaml}: output_type {cfg['output_type']!r} has no answer text to score per row; "
                         f"use one of {', '.join(OUTPUT_TYPES)}")
    here = path.parent
    staged = json.loads((here / EXTERNAL / "files.json").read_text()) if (here / EXTERNAL / "files.json").is_file() else {}
    if d := cfg.get("dataset_path"):
        if d in staged:
            cfg["dataset_path"] = str(here / staged[d])
        elif (here / d).is_dir():
            cfg["dataset_path"] = str(here / d)
        elif d not in LOCAL_BUILDERS:
            raise SuiteError(f"{task_yaml}: dataset_path {d!r} is neither a local directory nor one of "
                             f"{', '.join(LOCAL_BUILDERS)}: a hub dataset, which an offline suite cannot read; save its "
                             "test split as a JSONL file beside the YAML and set dataset_path: json with "
                             "dataset_kwargs.data_files")
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:
        def local(f: str) -> str:
            if f in staged:
                return str(here / staged[f])
            p = Path(f) if Path(f).is_absolute() else here / f
            if not p.exists():
                raise SuiteError(f"{task_yaml}: data file {f} not found (relative paths are read from {here}); "
                                 "suites run offline, so their data must be local files")
            return str(p)
        cfg["dataset_kwargs"]["data_files"] = ({k: [local(x) for x in v] if isinstance(v, list) else local(v)
                                                for k, v in files.items()} if isinstance(files, dict) else
                                               [local(x) for x in files] if isinstance(files, list) else local(files))
    return cfg


def _external(here: Path, f: str) -> Path | None:
    """The file or folder `f` (as the YAML writes it) names, when it lies outside the YAML's folder."""
    p = (Path(f) if Path(f).is_absolute() else here / f).resolve()
    return p if p.exists() and here != p and here not in p.parents else None


def stage_task(task_yaml: Path, dest: Path) -> Path:
    """Copy everything the task reads into `dest` (which must not exist): the YAML's folder, the data files
    and local dataset_path from outside it into dest/_external (mapped by files.json, which load_task
    reads), and a marker naming the YAML. Returns dest; keys.rows_hash(dest) is the suite's hash."""
    src = Path(task_yaml).resolve()
    cfg = load_task(src)  # refuses what cannot run before anything is copied
    raw = _read_yaml(src)
    here = src.parent
    shutil.copytree(here, dest)
    mapped = {}
    for i, f in enumerate([*_files_as_written(raw), *([str(raw["dataset_path"])] if raw.get("dataset_path") else [])]):
        if (p := _external(here, f)) is None or f in mapped:
            continue
        mapped[f] = f"{EXTERNAL}/{i}-{p.name}"
        (dest / EXTERNAL).mkdir(exist_ok=True)
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, dest / mapped[f])
    if mapped:
        (dest / EXTERNAL / "files.json").write_text(json.dumps(mapped, sort_keys=True))
    (dest / MARKER).write_text(json.dumps({"task_yaml": src.name, "task": cfg["task"]}))
    return dest


def filters(cfg: dict) -> list[str]:
    """The task's filter names in its order ("none": the harness's name when the task has no filter_list)."""
    return [f["name"] for f in cfg.get("filter_list") or []] or ["none"]


def check_task(task_yaml: Path, metric: str, filter_name: str | None = None) -> dict:
    """SuiteError naming the file and the fix for a task the suite runner cannot use with this metric and
    filter; before any work, without loading its data or a model. Returns the task config."""
    if importlib.util.find_spec("lm_eval") is None:
        raise SuiteError(f"{task_yaml}: lm-eval suites need the lm-evaluation-harness (the `lm_eval` package), which "
                         "this environment does not have: pip install 'qlora-ops[suites]', or give the suite's rows "
                         "as `path` instead")
    cfg = load_task(task_yaml)
    out_type = cfg.get("output_type", "generate_until")
    if filter_name is not None and filter_name not in filters(cfg):
        raise SuiteError(f"{task_yaml}: the suite's filter {filter_name!r} is not one of the task's filters "
                         f"({', '.join(filters(cfg))}); name one of them, or leave it out for the first")
    m = M.get(metric)
    if m.kind == "likelihood":
        raise SuiteError(f"{task_yaml}: {metric} needs the reference's likelihood, which an lm-eval task does not give "
                         "per row; choose a generation metric or a harness metric (lm_eval.acc, lm_eval.exact_match)")
    if m.kind == "harness":
        short = metric.removeprefix("lm_eval.")
        listed = [x.get("metric") for x in cfg.get("metric_list") or [] if isinstance(x, dict)]
        if short not in HARNESS_BY_TYPE[out_type] or (listed and short not in listed):
            raise SuiteError(f"{task_yaml}: {metric} is not a per-document metric of this {out_type} task "
                             f"(its metric_list: {', '.join(map(str, listed)) or 'the default'}); a {out_type} task "
                             f"gives {', '.join('lm_eval.' + h for h in HARNESS_BY_TYPE[out_type])} (add it to "
                             "metric_list), or use one of our metrics")
    elif out_type == "multiple_choice" and metric != "exact_match":
        raise SuiteError(f"{task_yaml}: {metric} on a multiple_choice task would score the chosen option's text "
                         "against the gold option's, which means nothing but right or wrong; use exact_match (the "
                         "harness's acc) or lm_eval.acc_norm")
    return cfg


def _texts(sample: dict, output_type: str) -> tuple[str, list[str]]:
    """(answer, every acceptable reference) of one logged sample."""
    target = sample["target"]
    golds = target if isinstance(target, list) else [target]
    if output_type == "multiple_choice":
        choices = [a[1].strip() for a in sample["arguments"]]  # (context, " choice") pairs, in choice order
        lls = [r[0] for r in sample["filtered_resps"]]
        best = max(range(len(lls)), key=lls.__getitem__)
        return choices[best], [choices[g] if isinstance(g, int) else str(g) for g in golds]
    answer = sample["filtered_resps"][0]
    return str(answer), [str(g) for g in golds]


def _number(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def run_suite(model, tok, task_yaml: Path, out_dir: Path, *, name: str, metrics: list[str] | None = None,
              system_prompt: str | None = None, limit: int | None = None, batch_size: int = 8,
              filter_name: str | None = None) -> dict:
    """Run the task on `model`; write out_dir/{predictions.jsonl,metrics.json} (tasks.evaluate.predict's format) and
    return metrics.json's dict. metrics: ours to compute on the texts, or the harness's own (`lm_eval.acc_norm`)
    (default exact_match; the first is the suite's metric). filter_name: the task's filter whose answers are
    scored (default its first)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    wanted = list(metrics or ["exact_match"])
    cfg = check_task(task_yaml, wanted[0], filter_name)
    for extra in wanted[1:]:
        check_task(task_yaml, extra, filter_name)
    names = list(dict.fromkeys([*(n for n in wanted if M.get(n).kind == "generation"), "exact_match"]))
    chosen = filter_name or filters(cfg)[0]
    t0 = time.time()
    out_type = cfg.get("output_type", "generate_until")
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    chat = bool(getattr(tok, "chat_template", None))
    res = simple_evaluate(model=lm, tasks=[cfg], task_manager=TaskManager(include_defaults=False), log_samples=True,
                         limit=limit, bootstrap_iters=0, apply_chat_template=chat,
                         system_instruction=system_prompt if chat else None)
    # One sample per filter and document: keep the chosen filter's, so each document is one row.
    samples = sorted((s for s in res["samples"][cfg["task"]] if s.get("filter", "none") == chosen),
                     key=lambda s: s["doc_id"])
    if not samples:
        raise SuiteError(f"{task_yaml}: the task has no documents in its test split")
    answers, refs = zip(*(_texts(s, out_type) for s in samples))
    per = {n: M.score(n, list(answers), list(refs)) for n in names}
    rows = []
    for i, s in enumerate(samples):
        own = {f"lm_eval.{m}": v for m in s.get("metrics", []) if (v := _number(s.get(m))) is not None}
        doc_id = s["doc"].get("id") if isinstance(s.get("doc"), dict) else None
        rows.append({"id": str(doc_id) if doc_id is not None else f"{cfg['task']}:{s['doc_id']}", "reference": refs[i][0],
                     **({"references": refs[i]} if len(refs[i]) > 1 else {}),
                     "prediction": answers[i], "stopped": None, "new_tokens": None,
                     "correct": per["exact_match"][i] == 1.0, "scores": {**{n: per[n][i] for n in names}, **own}})
    if len(ids := [r["id"] for r in rows]) != len(set(ids)):
        dup = sorted({x for x in ids if ids.count(x) > 1})[:5]
        raise SuiteError(f"{task_yaml}: document ids {dup} repeat; paired statistics need one row per document: give "
                         "each document a unique `id`, or drop the `id` field (rows are then named by position)")
    if missing := [m for m in wanted if M.get(m).kind == "harness" and any(m not in r["scores"] for r in rows)]:
        raise SuiteError(f"{task_yaml}: the harness logged no per-document {', '.join(missing)}; add it to the "
                         "task's metric_list")
    n = len(rows)
    means = {k: sum(r["scores"][k] for r in rows) / n for k in rows[0]["scores"]}
    gen = cfg.get("generation_kwargs") or {}
    out = {"model": name, "n": n, "metric": wanted[0], "metrics": means, "accuracy": means["exact_match"],
           "eos_rate": None, "max_new_tokens": gen.get("max_gen_toks") if out_type == "generate_until" else None,
           "eval_seconds": time.time() - t0,
           "lm_eval": {"task": cfg["task"], "output_type": out_type, "chat_template": chat, "filter": chosen,
                       "results": {k: v for k, v in res["results"][cfg["task"]].items() if _number(v) is not None}}}
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(out_dir / "metrics.json", out)
    return out


def evaluate_suite(params, name: str, model_dir: Path, task_yaml: Path, out_dir: Path, adapter_dir: Path | None = None,
                   quantized: bool = False, as_saved: bool = False, *, metrics: list[str] | None = None,
                   system_prompt: str | None = None, max_examples: int | None = None,
                   filter_name: str | None = None) -> dict:
    """tasks.evaluate.predict.evaluate_model's counterpart for an lm-eval suite: load the model the same way, run it."""
    import torch

    from qlora_ops.tasks.model.modeling import load_with_adapter

    if params.training.threads:
        torch.set_num_threads(params.training.threads)
    model, tok = load_with_adapter(params, model_dir, adapter_dir, quantized, as_saved)
    try:
        return run_suite(model, tok, task_yaml, out_dir, name=name, metrics=metrics,
                         system_prompt=params.data.system_prompt if system_prompt is None else system_prompt,
                         limit=max_examples, batch_size=params.eval.batch_size, filter_name=filter_name)
    finally:
        del model
