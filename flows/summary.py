"""What `qlora-ops run` prints at the end: the summary of one run (flows/retrain.py builds the dict), its gate
table, the data's changes, the models' scores with their intervals, the registry's decision and its guards."""
from __future__ import annotations

from qlora_ops.tasks.data import diff as data_diff
from qlora_ops.tasks.gates import paired


def score_label(models: dict) -> str:
    """The domain table's score column: "accuracy" for exact match (as it always read), else the metric."""
    metric = next(iter(models.values()), {}).get("metric", "exact_match")
    return "accuracy" if metric == "exact_match" else metric


def gate_table(verdicts: list[dict]) -> str:
    levels = {v.get("confidence") for v in verdicts}
    head = f"{paired.level(levels.pop())} interval" if len(levels) == 1 and None not in levels else "interval"
    L = [f"{'gate':<20}{'value':>8}  {head:<17}{'op':<3}{'threshold':>9}  verdict"]
    for v in verdicts:
        # The interval of the gate's own value; retention's (of QLoRA - LoRA) is in its detail line.
        ci = f"[{v['ci_low']:.3f}, {v['ci_high']:.3f}]" if v.get("ci_low") is not None and v["ci_of"] == "value" else ""
        L.append(f"{v['name']:<20}{v['value']:>8.4f}  {ci:<17}{v['op']:<3}{v['threshold']:>9}  "
                 f"{'PASS' if v['passed'] else 'FAIL'}  ({v['decided_on']})")
    return "\n".join(L)


def _changes_lines(s: dict) -> list[str]:
    c = (s.get("data") or {}).get("changes")
    if not c:
        return []
    L = ["data files: " + "   ".join(f"{k} {len(c[k])}" + (f" ({', '.join(c[k][:5])}{' ...' if len(c[k]) > 5 else ''})"
                                                               if c[k] else "") for k in ("added", "changed", "removed", "ignored"))]
    if c["ignored"]:
        L.append("  ignored = not a data file (*.jsonl, *.csv, *.parquet, *.arrow, a save_to_disk folder) or a hidden "
                 "name (starting with '.' or '_'): rename it to have it read")
    L += [f"QUARANTINED drop {q['name']} -> {q['to']}: {q['reason'].splitlines()[0][:200]}" for q in c.get("quarantined") or []]
    return L


def _diff_lines(s: dict) -> list[str]:
    """Two lines of the data card (tasks/data/diff.py card_lines): the row counts, then the label shift when
    the data has labels, else the counts per split."""
    if not (d := (s.get("data") or {}).get("diff")):
        return []
    lines = data_diff.card_lines(d)
    return lines[:1] + ([x for x in lines[1:] if x.lstrip().startswith("labels")] or lines[1:2])[:1]


def format_summary(s: dict) -> str:
    L = ["", "=" * 72, *_changes_lines(s), *_diff_lines(s)]
    if s["outcome"] == "skipped":
        L += [f"qlora-ops: skipped. {s['reason']}",
              f"data version {s['data']['version']}   fingerprint {s['fingerprint']}",
              f"total wall time: {s['stage_seconds'].get('total', 0):.1f} s", "=" * 72]
        return "\n".join(L)
    L += [f"qlora-ops summary  mlflow run {s['mlflow_run_id']}",
          f"data version {s['data']['version']} ({s['data']['stage']})   code {str(s['code']['git_commit'])[:10]}"
          f"{' (dirty)' if s['code']['git_dirty'] else ''} sha {s['code']['source_sha']}   fingerprint {s['fingerprint']}",
          *([f"rows train/val/test {st['train']}/{st['val']}/{st['test']}, inputs truncated to "
             f"{st['max_input_chars']} chars: {st['inputs_truncated']}"
             + (f"; test-set lineage {st['lineage']}, contamination {st['contamination']}, near-duplicate rows "
                f"{st['near_duplicate_rows']}" if "contamination" in st else "")]
            if (st := s["data"].get("stats")) and "inputs_truncated" in st else []),
          "", f"{'model':<10}{score_label(s['models']):>10}  {paired.level(s.get('confidence', 0.95)) + ' interval':<17}"
          f"{'eos_rate':>8}{'n':>6}{'eval_s':>9}{'s/100 rows':>12}"]
    for name, m in s["models"].items():
        ci = f"[{m['ci_low']:.3f}, {m['ci_high']:.3f}]" if "ci_low" in m else ""
        L.append(f"{name:<10}{m.get('score', m['accuracy']):>10.4f}  {ci:<17}{m['eos_rate']:>8.2f}{m['n']:>6}"
                 f"{m['eval_seconds']:>9.1f}{100 * m['eval_seconds'] / max(m['n'], 1):>12.1f}"
                 f"{'  (cached)' if m.get('cached') else ''}")
    for name, st in (s.get("suites") or {}).items():
        gated = {"gain": f"gain >= {st['threshold']:g}", "non_inferior": f"non-inferior, margin {st['threshold']:g}"}
        L += ["", f"suite {name}: {st['metric']}, {gated.get(st['role'], 'reported only')}, {st['n']} rows"]
        for model, m in st["models"].items():
            L.append(f"  {model:<10}{m['score']:>10.4f}  [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"
                     f"{'  (cached)' if m.get('cached') else ''}")
    L += ["", gate_table(s["gates"])]
    L += [f"  {v['name']}: {v['detail']}" for v in s["gates"]]
    if s.get("power"):
        L.append(f"note: {s['power']}")
    L.append("")
    r = s["registry"]
    if r.get("version"):
        L.append(f"registry: {r['model_name']} v{r['version']} registered; alias '{r['alias']}' -> v{r['champion_version']} "
                 f"({r['reason']})")
        if r.get("decisions"):
            L.append(f"decisions: {r['decisions']}")
        if s.get("lineage_restart"):
            L.append(s["lineage_restart"])
        L += [f"guard vs champion {g['name']}: {'PASS' if g['passed'] else 'FAIL'}  ({g['detail'][:160]})"
              for g in r.get("guards") or []]
    else:
        L.append(f"registry: nothing registered ({r['reason']})")
    L.append("stage seconds: " + " | ".join(f"{k} {v}" for k, v in s["stage_seconds"].items() if k != "total"))
    if s.get("stage_peak_mb"):
        L.append("stage peak MiB: " + " | ".join(f"{k} {v:.0f}" for k, v in s["stage_peak_mb"].items()))
    if s.get("report"):
        L.append(f"report: {s['report']}")
    L.append(f"total wall time: {s['stage_seconds'].get('total', 0):.1f} s")
    L.append("=" * 72)
    return "\n".join(L)
