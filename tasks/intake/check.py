"""`qlora-ops check --params FILE`: validate params and data, say what a run would do, train nothing.

    print(format_check(check(Path("params/tickets.yaml"), Path("."))))

The same validation as a run (tasks.core.config.load_params, then tasks.data.prepare.prepare into a scratch
directory: every bad line/row named), so a clean check means the run gets past its data stage. With
data.source set, a local source is read where it is and a URL is snapshotted into a scratch directory;
the workspace is never written.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from qlora_ops.tasks import metrics as M
from qlora_ops.tasks.core.config import DataParams, Params, ParamsError, load_params
from qlora_ops.tasks.data.prepare import DataError, prepare, prepared_rows
from qlora_ops.tasks.core.paths import tracking_uri, ws_path
from qlora_ops.tasks.core.secrets import redact_url
from qlora_ops.tasks.data.samples import build_sample
from qlora_ops.tasks.data.sources import is_url, snapshot
from qlora_ops.tasks.gates.policy import PromotionPolicy, power_check
from qlora_ops.tasks.core.util import read_jsonl
from qlora_ops.tasks.data.versioning import SAMPLES, check_prepared_dir, remote_url, stage_name
from qlora_ops.tasks.metrics import get
from qlora_ops.tasks.gates.paired import ASSUMED_SD
from qlora_ops.tasks.gates.sizing import refuse_small


def _assumed_noise(metric: str) -> dict:
    """Before any model has answered, the power line assumes the noise of the gate metric's kind: the
    discordance of 0/1 scores, or the sd of continuous per-row differences (tasks/gates/paired.py)."""

    return {} if get(metric).binary else {"sd": ASSUMED_SD}


def _looks_local(src: str) -> bool:
    return src.startswith(("/", ".", "~"))  # a hub id is org/name: never absolute or dotted


def check(params_path: Path, workspace: Path) -> dict:
    """What a run of this params file would do; ParamsError / DataError (naming the key or file:line)."""
    ws = Path(workspace).resolve()
    pfile = ws_path(ws, params_path).resolve()
    params = load_params(pfile)
    rel = os.path.relpath(pfile, ws)
    if rel.startswith(".."):
        raise ParamsError(f"{pfile}: the params file must be inside the workspace {ws} (DVC tracks it); copy it into params/")
    check_prepared_dir(ws, pfile, params)  # what `run` would meet in DVC: a copied file's data.prepared
    d = params.data
    src = model = None
    with tempfile.TemporaryDirectory(prefix="qlora-ops-check-") as tmp:
        raw = d.raw
        if d.source:
            if is_url(d.source):
                try:
                    snapshot(d.source, Path(tmp) / "source", d.source_options)
                except ParamsError as e:
                    raise ParamsError(f"{pfile}: {e}") from None
                raw = str(Path(tmp) / "source")
            else:
                raw = str(ws_path(ws, d.source.removeprefix("file://")))
            src = redact_url(d.source)
        elif (task := SAMPLES.get(os.path.relpath(ws_path(ws, raw), ws))) and not ws_path(ws, raw).exists():
            # A built-in sample is made by its dvc.yaml stage on the first run: build it here too.
            build_sample(Path(tmp) / "sample.jsonl", task)
            raw = str(Path(tmp) / "sample.jsonl")
        probe = params.model_copy(update={"data": d.model_copy(update={"raw": raw})})
        stats = prepare(probe, ws, out=Path(tmp) / "prepared")
        if "json_match" in (params.eval.metric, *params.eval.report_metrics):
            check_json_answers(Path(tmp) / "prepared")
    m = params.model.source
    if m != "smollm2-gguf" and _looks_local(m) and not ws_path(ws, m).is_dir():
        raise ParamsError(f"{pfile}: model.source={m!r} is not a directory; point it at a local Hugging Face model "
                          "directory (safetensors), or use smollm2-gguf")
    model = "SmolLM2-135M-Instruct (embedded GGUF)" if m == "smollm2-gguf" else m
    t = params.training
    steps = t.max_steps if t.epochs is None else math.ceil(t.epochs * stats["train"] / (t.batch_size * t.grad_accum))
    n_eval = min(stats["test"], params.eval.max_examples or stats["test"])
    refuse_small(params, n_eval, suite_rows(params, ws), str(pfile))  # as `run` does, before any training
    r = params.registry
    policy = PromotionPolicy.from_registry(r)
    return {"params": Path(rel).as_posix(), "stage": stage_name(Path(rel).as_posix()), "raw": d.raw, "source": src,
            "stats": stats, "steps": steps, "examples_seen": steps * t.batch_size * t.grad_accum, "model": model,
            "eval_rows": n_eval, "power": power_check(policy, n_eval, **_assumed_noise(params.eval.metric)), "tracking_uri": redact_url(tracking_uri(ws, params)),
            "model_name": r.model_name, "dvc_remote": redact_url(remote_url(ws, params)), "gpu_pool": params.orchestration.gpu_pool,
            "labels": params.data.labels, "metric": params.eval.metric, "report_metrics": params.eval.report_metrics,
            "gates": params.gates.model_dump(), "policy": {"non_inferiority_margin": r.non_inferiority_margin,
                                                           "min_improvement": r.min_improvement}}


def suite_rows(params: Params, ws: Path) -> dict[str, int | None]:
    """Each suite's rows after its max_examples, read as `run` reads them (lm-eval suites: max_examples, or
    unknown until the harness loads them)."""
    d, out = params.data, {}
    for s in params.eval.suites:
        if s.lm_eval is not None:
            out[s.name] = s.max_examples
            continue
        how = DataParams(format="auto", columns=d.columns if s.columns is None else s.columns, labels=None,
                         max_input_chars=d.max_input_chars, system_prompt=s.system_prompt or d.system_prompt)
        out[s.name] = len(prepared_rows(ws_path(ws, s.path), how, limit=s.max_examples))
    return out


def check_json_answers(prepared: Path) -> None:
    """json_match needs every reference answer to be JSON: refuse before any training, naming the rows."""
    bad = []
    for split in ("train", "val", "test"):
        for r in read_jsonl(prepared / f"{split}.jsonl"):
            try:
                json.loads(r["completion"])
            except ValueError:
                bad.append(f"{split} row {r['id']}: {r['completion'][:60]!r}")
    if bad:
        raise DataError(f"eval.metric json_match scores answers against JSON references, but {len(bad)} answer(s) "
                        f"are not JSON; fix them or choose another eval.metric (rouge_l, token_f1, chrf):\n  "
                        + "\n  ".join(bad[:20]))


def format_check(c: dict) -> str:
    s = c["stats"]
    formats = sorted(set(s["formats"].values()))
    lines = [f"params    {c['params']}: valid (DVC stage {c['stage']})",
             f"data      {c['source'] + ' -> ' + c['raw'] if c['source'] else c['raw']}: {', '.join(formats)} "
             f"({len(s['formats'])} file{'s' if len(s['formats']) != 1 else ''})",
             f"rows      {s['rows_raw']} read, {s['rows_after_dedupe']} after dedupe ({s['duplicates_dropped']} duplicates "
             f"dropped), {s['inputs_truncated']} inputs cut to {s['max_input_chars']} chars",
             f"splits    train {s['train']} / val {s['val']} / test {s['test']}"]
    counts = s.get("labels")
    if c["labels"]:
        lines.append(f"labels    {len(c['labels'])} (data.labels): " + ", ".join(f"{k} {counts.get(k, 0)}" if counts else k
                                                                          for k in c["labels"][:20]))
    elif counts and len(counts) <= 20:
        lines.append(f"answers   {len(counts)} distinct: " + ", ".join(f"{k!r} {v}" for k, v in list(counts.items())[:20]))
    else:
        lines.append(f"answers   free text ({len(counts) if counts else 'over 1000'} distinct)")
    epochs = c["examples_seen"] / max(s["train"], 1)
    lines += [f"training  QLoRA and the LoRA baseline, {c['steps']} steps each ({c['examples_seen']} examples, "
              f"~{epochs:.1f} epochs of train)",
              f"model     {c['model']}",
              *metric_lines(c),
              f"eval      base, LoRA, QLoRA, merged on {c['eval_rows']} test rows"
              + (f"\n          note: {c['power']}" if c["power"] else ""),
              f"stores    MLflow {c['tracking_uri']} (registered model {c['model_name']}); DVC remote {c['dvc_remote']}"
              + (f"; model stage on pool {c['gpu_pool']}" if c["gpu_pool"] else "; model stage in-process"),
              "nothing was trained or written."]
    return "\n".join(lines)


def metric_lines(c: dict) -> list[str]:
    """What the gate metric measures, and every gate and promotion margin in its units."""
    m, g, pol = M.get(c["metric"]), c["gates"], c["policy"]
    scale = f"{m.lo:g}..{m.hi:g}" if m.hi != float("inf") else f">= {m.lo:g}"
    merge = "rows whose answers differ" if m.binary else f"mean |merged - QLoRA| per-row {m.name}"
    gain = "QLoRA - base" if m.higher_is_better else "base - QLoRA (the reduction)"
    also = [x for x in c["report_metrics"] if x != m.name]
    return [f"metric    {m.name} ({'higher' if m.higher_is_better else 'lower'} is better, {scale} per row): {m.doc}"
            + (f"; also reported: {', '.join(also)}" if also else ""),
            f"gates     each: its paired test rejects AND its interval's bound clears the bar; gain: lower bound of "
            f"{gain} >= {g['min_gain_over_base']:g}; retention: lower bound of the share of the LoRA baseline's gain "
            f"QLoRA keeps >= {g['min_retention_vs_lora']:g}; merge: upper bound of {merge} <= {g['max_merge_disagreement']:g}",
            f"promote   better than the champion by >= {pol['min_improvement']:g}, never worse by more than "
            f"{pol['non_inferiority_margin']:g} (interval lower bound), both in {m.name} units"]
