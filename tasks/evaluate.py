"""Evaluate stage: greedy-decode the test split and score it with a local `evaluate` metric.

Every model (base, LoRA, QLoRA, merged, current champion) sees the same rows, the same prompts
and the same decoding, so their accuracies are comparable. Generation is batched with left
padding: one forward per prompt token block instead of one per example.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from tasks.config import Params
from tasks.modeling import load_with_adapter
from tasks.progress import progress
from tasks.prompting import format_prompt, stop_ids
from tasks.util import atomic_write_json, atomic_write_text, read_json, read_jsonl

log = logging.getLogger("qlora_ops.evaluate")

METRIC_DIR = Path(__file__).parent / "metrics" / "label_accuracy"


@torch.no_grad()
def generate(model, tok, rows: list[dict], batch_size: int, max_new_tokens: int, desc: str = "eval") -> list[dict]:
    dev = next(model.parameters()).device
    tok.padding_side = "left"
    stops = stop_ids(tok)  # the template's turn end (and eos): not always eos_token
    out = []
    with progress(len(rows), desc, unit="rows") as bar:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            out += _generate_batch(model, tok, chunk, dev, stops, max_new_tokens)
            bar.update(len(chunk))
    return out


def _generate_batch(model, tok, chunk: list[dict], dev, stops, max_new_tokens: int) -> list[dict]:
    out = []
    texts = [format_prompt(tok, r["system"], r["prompt"]) for r in chunk]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
    gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                         pad_token_id=tok.pad_token_id)
    for r, g in zip(chunk, gen[:, enc["input_ids"].shape[1]:].tolist()):
        end = next((i for i, t in enumerate(g) if t in stops), None)
        stopped = end is not None
        g = g[:end] if stopped else g
        out.append({"id": r["id"], "reference": r["completion"], "prediction": tok.decode(g, skip_special_tokens=True).strip(),
                    "stopped": stopped, "new_tokens": len(g)})
    return out


def score(preds: list[dict]) -> dict:
    import evaluate
    metric = evaluate.load(str(METRIC_DIR))
    res = metric.compute(predictions=[p["prediction"] for p in preds], references=[p["reference"] for p in preds])
    for p, hit in zip(preds, res.pop("hits")):
        p["correct"] = bool(hit)
    res["eos_rate"] = sum(p["stopped"] for p in preds) / max(len(preds), 1)
    return res


def per_row(eval_dir: Path) -> dict:
    """The saved per-row results of one evaluation (ids, correct, answers), in test-row order: what every
    paired comparison (gates, promotion) reads."""
    preds = read_jsonl(Path(eval_dir) / "predictions.jsonl")
    return {"ids": [r["id"] for r in preds], "correct": [bool(r["correct"]) for r in preds],
            "answers": [r["prediction"] for r in preds]}


def cached_metrics(eval_dir: Path) -> dict | None:
    """An earlier evaluation's metrics, or None when there is none or it is damaged (unparsable, or
    predictions that do not match its row count): a damaged cache is evaluated again, never trusted.
    Both files are written atomically, so damage means the disk, not a crash of ours."""
    d = Path(eval_dir)
    if not (d / "metrics.json").is_file():
        return None
    try:
        m = read_json(d / "metrics.json")
        if len(per_row(d)["ids"]) != m["n"]:
            raise ValueError(f"{m['n']} rows in metrics.json, other count in predictions.jsonl")
        return m
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("damaged eval cache %s (%s): evaluating again", d, e)
        return None


def test_rows(params: Params, test_path: Path) -> list[dict]:
    rows = read_jsonl(test_path)
    return rows[:params.eval.max_examples] if params.eval.max_examples else rows


def answer_budget(tok, rows: list[dict]) -> int:
    """Tokens the longest reference answer needs, plus its turn end: any fixed cap below that would
    silently score every longer label as wrong."""
    return max(len(tok(r["completion"], add_special_tokens=False).input_ids) for r in rows) + 1


def evaluate_model(params: Params, name: str, model_dir: Path, test_path: Path, out_dir: Path,
                   adapter_dir: Path | None = None, quantized: bool = False, as_saved: bool = False) -> dict:
    """Evaluate one model; writes out_dir/{predictions.jsonl,metrics.json} and returns the metrics."""
    t0 = time.time()
    if params.training.threads:
        torch.set_num_threads(params.training.threads)
    model, tok = load_with_adapter(params, model_dir, adapter_dir, quantized, as_saved)
    rows = test_rows(params, test_path)
    max_new = params.eval.max_new_tokens or answer_budget(tok, rows)
    preds = generate(model, tok, rows, params.eval.batch_size, max_new, desc=f"eval {name}")
    res = {"model": name, **score(preds), "max_new_tokens": max_new, "eval_seconds": time.time() - t0}
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in preds))
    atomic_write_json(out_dir / "metrics.json", res)
    del model
    return res
