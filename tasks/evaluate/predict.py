"""Evaluate stage: greedy-decode the test split and score every row with the chosen metrics.

Every model (base, LoRA, QLoRA, merged, current champion) sees the same rows, the same prompts
and the same decoding, so their scores are comparable row by row. Generation is batched with left
padding: one forward per prompt token block instead of one per example. Generation metrics
(tasks/metrics: exact match, token F1, ROUGE-L, chrF, JSON match) score the generated answers; `nll`
scores the reference answer itself under teacher forcing, with the same loaded model.

    <out>/predictions.jsonl  one row per test row: id, reference, prediction, stopped, new_tokens,
                             correct (exact match, always), scores {metric: float}
    <out>/metrics.json       model, n, metric (the gate metric), metrics {metric: mean}, accuracy
                             (exact-match mean, always), eos_rate, max_new_tokens, eval_seconds
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import torch

from qlora_ops.tasks import metrics as M
from qlora_ops.tasks.core.config import Params
from qlora_ops.tasks.model.modeling import load_with_adapter
from qlora_ops.tasks.core.progress import progress
from qlora_ops.tasks.model.prompting import encode, format_prompt, stop_ids
from qlora_ops.tasks.core.util import atomic_write_json, atomic_write_text, read_json, read_jsonl

log = logging.getLogger("qlora_ops.evaluate")


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


def metric_names(params: Params, metrics: list[str] | None = None) -> list[str]:
    """The metrics an evaluation computes: the gate metric, the reported ones, and exact match always
    (metrics.json's `accuracy` and every row's `correct` stay defined for every task)."""
    names = metrics if metrics is not None else [params.eval.metric, *params.eval.report_metrics]
    for n in names:
        M.get(n)  # ValueError naming the valid names
    return list(dict.fromkeys([*names, "exact_match"]))


def score(preds: list[dict], metrics: list[str] = ("exact_match",), nll: list[tuple[float, int]] | None = None,
          tokenizer: str | None = None) -> dict:
    """Score the rows in place (`correct`, `scores`) and return their means: {metrics, accuracy, n, eos_rate}.
    nll: (nats, tokens) per row (nll_rows). A row's nll score is its nats per token (the paired gates compare
    rows); the reported nll is the corpus's, total nats over total tokens (a mean of per-row means would
    weigh a 2-token answer like a 200-token one), with bits per byte beside it (`nll_totals`): per token
    depends on the tokenizer, per UTF-8 byte of the references does not, so bases with different
    tokenizers compare on bits per byte only."""
    names = list(dict.fromkeys([*metrics, "exact_match"]))
    answers, refs = [p["prediction"] for p in preds], [p["reference"] for p in preds]
    if "nll" in names and (nll is None or len(nll) != len(preds)):
        raise ValueError("nll needs one likelihood per row from the model (tasks.evaluate.predict.nll_rows)")
    per = {n: ([nats / max(k, 1) for nats, k in nll] if n == "nll" else M.score(n, answers, refs)) for n in names}
    for i, p in enumerate(preds):
        p["correct"] = per["exact_match"][i] == 1.0
        p["scores"] = {n: per[n][i] for n in names}
    n = len(preds)
    means = {k: sum(v) / n if n else 0.0 for k, v in per.items()}
    out = {"metrics": means, "accuracy": means["exact_match"], "n": n,
           "eos_rate": sum(p["stopped"] for p in preds) / max(n, 1)}
    if "nll" in names:
        nats, tokens = sum(x for x, _ in nll), sum(k for _, k in nll)
        n_bytes = sum(len(r.encode("utf-8")) for r in refs)
        means["nll"] = nats / max(tokens, 1)
        out["nll_totals"] = {"nats": nats, "tokens": tokens, "bytes": n_bytes, "tokenizer": tokenizer,
                             "nats_per_token": means["nll"], "bits_per_byte": nats / math.log(2) / max(n_bytes, 1)}
    return out


def per_row(eval_dir: Path) -> dict:
    """The saved per-row results of one evaluation, in test-row order: what every paired comparison
    (gates, promotion) reads. {ids, answers, correct, scores: {metric: [float]}}; an evaluation saved
    before per-row scores existed has its exact match as its only score."""
    preds = read_jsonl(Path(eval_dir) / "predictions.jsonl")
    names = list(preds[0].get("scores") or {"exact_match": 0}) if preds else ["exact_match"]
    out = {"ids": [r["id"] for r in preds], "correct": [bool(r["correct"]) for r in preds],
           "answers": [r["prediction"] for r in preds],
           "scores": {n: [float(r["scores"][n]) if "scores" in r else float(bool(r["correct"])) for r in preds]
                      for n in names}}
    if "nll" in names and (Path(eval_dir) / "metrics.json").is_file():  # nats per token: of which tokenizer
        out["tokenizer"] = (read_json(Path(eval_dir) / "metrics.json").get("nll_totals") or {}).get("tokenizer")
    return out


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


@torch.no_grad()
def nll_rows(model, tok, rows: list[dict], batch_size: int, max_len: int, desc: str = "nll") -> list[tuple[float, int]]:
    """Per row: (total negative log-likelihood in nats, tokens) of the reference answer and its turn end
    given the prompt, teacher-forced: exactly the tokens training puts its loss on (tasks.model.prompting.encode,
    prompt cut from the left to fit max_len as in training: model.max_seq_len is in the score key). No generation."""
    dev = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: list[float] = []
    with progress(len(rows), desc, unit="rows") as bar:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            # A reference longer than max_seq_len still gets its whole likelihood: the prompt is cut instead.
            exs = [encode(tok, r, max(max_len, len(tok(r["completion"], add_special_tokens=False).input_ids) + 2))
                   for r in chunk]
            out += _nll_batch(model, exs, pad, dev)
            bar.update(len(chunk))
    return out


def tokenizer_id(tok) -> str:
    """What nats per token are counted in: a hash of the vocabulary (two bases with different ones compare
    on bits per byte only)."""
    return hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()[:16]


def _nll_batch(model, exs: list[tuple[list[int], list[int]]], pad: int, dev) -> list[tuple[float, int]]:
    T = max(len(x) for x, _ in exs)
    ids = torch.full((len(exs), T), pad, dtype=torch.long)
    labels = torch.full((len(exs), T), -100, dtype=torch.long)
    mask = torch.zeros((len(exs), T), dtype=torch.long)
    for j, (x, y) in enumerate(exs):  # left padding, as generation and training batch
        ids[j, T - len(x):], labels[j, T - len(y):], mask[j, T - len(x):] = torch.tensor(x), torch.tensor(y), 1
    K = int(max(sum(t != -100 for t in y) for _, y in exs)) + 1  # logits only where targets are
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                   logits_to_keep=K, use_cache=False).logits.float()
    tgt = labels[:, -K + 1:].to(dev)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), tgt.reshape(-1),
                                           ignore_index=-100, reduction="none").view(len(exs), -1)
    n = (tgt != -100).sum(1)
    return list(zip(ce.sum(1).tolist(), n.tolist()))


def evaluate_model(params: Params, name: str, model_dir: Path, test_path: Path, out_dir: Path,
                   adapter_dir: Path | None = None, quantized: bool = False, as_saved: bool = False, *,
                   metrics: list[str] | None = None, system_prompt: str | None = None) -> dict:
    """Evaluate one model; writes out_dir/{predictions.jsonl,metrics.json} and returns the metrics.
    metrics: default [eval.metric, *eval.report_metrics] (exact match always added); system_prompt
    replaces every row's own (a suite's prompt)."""
    t0 = time.time()
    names = metric_names(params, metrics)
    if params.training.threads:
        torch.set_num_threads(params.training.threads)
    model, tok = load_with_adapter(params, model_dir, adapter_dir, quantized, as_saved)
    rows = test_rows(params, test_path)
    if system_prompt is not None:
        rows = [{**r, "system": system_prompt} for r in rows]
    max_new = params.eval.max_new_tokens or answer_budget(tok, rows)
    preds = generate(model, tok, rows, params.eval.batch_size, max_new, desc=f"eval {name}")
    nll = (nll_rows(model, tok, rows, params.eval.batch_size, params.model.max_seq_len, desc=f"nll {name}")
           if "nll" in names else None)
    scored = score(preds, names, nll, tokenizer_id(tok) if nll else None)
    res = {"model": name, "metric": names[0], **scored, "max_new_tokens": max_new,
           "eval_seconds": time.time() - t0}
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in preds))
    atomic_write_json(out_dir / "metrics.json", res)
    del model
    return res
