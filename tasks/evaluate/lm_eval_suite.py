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
metrics are kept beside them as `lm_eval.<name>`.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from qlora_ops.tasks import metrics as M
from qlora_ops.tasks.core.util import atomic_write_json, atomic_write_text

OUTPUT_TYPES = ("generate_until", "multiple_choice")


class SuiteError(ValueError):
    """A task YAML the suite runner cannot use: the message names the file and the fix."""


def load_task(task_yaml: Path) -> dict:
    """The task config as the harness reads it, with its local data paths made absolute."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:
        raise SuiteError(f"{task_yaml}: lm-eval suites need the lm-evaluation-harness: pip install 'qlora-ops[suites]'") from None
    path = Path(task_yaml).resolve()
    if not path.is_file():
        raise SuiteError(f"{task_yaml}: task YAML not found; point the suite's lm_eval at a local lm-eval task file")
    cfg = load_yaml(path)
    if "task" not in cfg or "group" in cfg:
        raise SuiteError(f"{task_yaml}: one task per suite (a `task:` name, not a group); write one YAML per task")
    if cfg.get("output_type", "generate_until") not in OUTPUT_TYPES:
        raise SuiteError(f"{task_yaml}: output_type {cfg['output_type']!r} has no answer text to score per row; "
                         f"use one of {', '.join(OUTPUT_TYPES)}")
    here = path.parent
    if (d := cfg.get("dataset_path")) and (here / d).exists():
        cfg["dataset_path"] = str(here / d)
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:
        def local(f: str) -> str:
            p = Path(f) if Path(f).is_absolute() else here / f
            if not p.exists():
                raise SuiteError(f"{task_yaml}: data file {f} not found (relative paths are read from {here}); "
                                 "suites run offline, so their data must be local files")
            return str(p)
        cfg["dataset_kwargs"]["data_files"] = ({k: [local(x) for x in v] if isinstance(v, list) else local(v)
                                                for k, v in files.items()} if isinstance(files, dict) else
                                               [local(x) for x in files] if isinstance(files, list) else local(files))
    return cfg


def _texts(sample: dict, output_type: str) -> tuple[str, str]:
    """(answer, reference) of one logged sample."""
    target = sample["target"]
    if output_type == "multiple_choice":
        choices = [a[1].strip() for a in sample["arguments"]]  # (context, " choice") pairs, in choice order
        lls = [r[0] for r in sample["filtered_resps"]]
        best = max(range(len(lls)), key=lls.__getitem__)
        gold = target[0] if isinstance(target, list) else target
        return choices[best], choices[gold] if isinstance(gold, int) else str(gold)
    answer = sample["filtered_resps"][0]
    return str(answer), str(target[0] if isinstance(target, list) else target)


def _number(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def run_suite(model, tok, task_yaml: Path, out_dir: Path, *, name: str, metrics: list[str] | None = None,
              system_prompt: str | None = None, limit: int | None = None, batch_size: int = 8) -> dict:
    """Run the task on `model`; write out_dir/{predictions.jsonl,metrics.json} (tasks.evaluate.predict's format) and
    return metrics.json's dict. metrics: ours to compute on the texts (default exact_match; the first
    is the suite's metric)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = list(dict.fromkeys([*(metrics or ["exact_match"]), "exact_match"]))
    if bad := [n for n in names if M.get(n).kind != "generation"]:
        raise SuiteError(f"{task_yaml}: {', '.join(bad)} needs the reference's likelihood, which an lm-eval task does "
                         "not give per row; choose a generation metric (exact_match, token_f1, rouge_l, chrf, json_match)")
    t0 = time.time()
    cfg = load_task(task_yaml)
    out_type = cfg.get("output_type", "generate_until")
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    chat = bool(getattr(tok, "chat_template", None))
    res = simple_evaluate(model=lm, tasks=[cfg], task_manager=TaskManager(include_defaults=False), log_samples=True,
                         limit=limit, bootstrap_iters=0, apply_chat_template=chat,
                         system_instruction=system_prompt if chat else None)
    samples = sorted(res["samples"][cfg["task"]], key=lambda s: s["doc_id"])
    if not samples:
        raise SuiteError(f"{task_yaml}: the task has no documents in its test split")
    answers, refs = zip(*(_texts(s, out_type) for s in samples))
    per = {n: M.score(n, list(answers), list(refs)) for n in names}
    rows = []
    for i, s in enumerate(samples):
        own = {f"lm_eval.{m}": v for m in s.get("metrics", []) if (v := _number(s.get(m))) is not None}
        doc_id = s["doc"].get("id") if isinstance(s.get("doc"), dict) else None
        rows.append({"id": str(doc_id) if doc_id is not None else f"{cfg['task']}:{s['doc_id']}", "reference": refs[i],
                     "prediction": answers[i], "stopped": None, "new_tokens": None,
                     "correct": per["exact_match"][i] == 1.0, "scores": {**{n: per[n][i] for n in names}, **own}})
    n = len(rows)
    means = {k: sum(r["scores"][k] for r in rows) / n for k in rows[0]["scores"]}
    gen = cfg.get("generation_kwargs") or {}
    out = {"model": name, "n": n, "metric": names[0], "metrics": means, "accuracy": means["exact_match"],
           "eos_rate": None, "max_new_tokens": gen.get("max_gen_toks") if out_type == "generate_until" else None,
           "eval_seconds": time.time() - t0,
           "lm_eval": {"task": cfg["task"], "output_type": out_type, "chat_template": chat,
                       "results": {k: v for k, v in res["results"][cfg["task"]].items() if _number(v) is not None}}}
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(out_dir / "metrics.json", out)
    return out


def evaluate_suite(params, name: str, model_dir: Path, task_yaml: Path, out_dir: Path, adapter_dir: Path | None = None,
                   quantized: bool = False, as_saved: bool = False, *, metrics: list[str] | None = None,
                   system_prompt: str | None = None, max_examples: int | None = None) -> dict:
    """tasks.evaluate.predict.evaluate_model's counterpart for an lm-eval suite: load the model the same way, run it."""
    import torch

    from qlora_ops.tasks.model.modeling import load_with_adapter

    if params.training.threads:
        torch.set_num_threads(params.training.threads)
    model, tok = load_with_adapter(params, model_dir, adapter_dir, quantized, as_saved)
    try:
        return run_suite(model, tok, task_yaml, out_dir, name=name, metrics=metrics,
                         system_prompt=params.data.system_prompt if system_prompt is None else system_prompt,
                         limit=max_examples, batch_size=params.eval.batch_size)
    finally:
        del model
