"""`qlora-ops init DATAFILE`: a params file for the data you have.

    write_params(Path("data/raw/tickets.csv"), workspace=Path("."))   # -> params/tickets.yaml

Reads the data once (the same validation as a run: every bad row is named and nothing is written),
then writes a params file holding what differs from the defaults for this data:

- data.format and data.columns, detected from the column names (common aliases such as
  question/answer or text/label are mapped; anything else is an error asking for data.columns);
- data.labels (and a system prompt listing them) when the answers are labels: few distinct short
  answers, each seen several times;
- eval.metric chosen from the answers (choose_metric: labels or numbers -> exact_match; a majority of
  JSON -> json_match, the other answers named; code -> exact_match when short, chrf when long; text
  mostly in a non-Latin script -> chrf; other free text -> rouge_l), with gate thresholds and promotion
  margins on that metric's scale and one comment saying why (choose_metric, GATES);
- data.split sized for the promotion policy: enough test rows to tell a registry.non_inferiority_margin
  difference (tasks.gates.policy.rows_needed) where the data has them, capped so training keeps most of the
  rows; a comment says what the chosen size can detect;
- data.raw pointing at the file when it is inside the workspace (DVC versions it there), else
  data.source pointing at it (each run snapshots it into data.raw);
- its own registered model name, so its champion never competes with another data set's;
- gates.min_gain_over_base from the base model measured on the validation rows (`base_scorer`, which the CLI
  passes: tasks.evaluate.base_probe.score_base): where the base already scores well, half its headroom
  replaces the fixed bar, which it could never clear at the interval's lower bound (measured_bar).

The file opens with the commands that check and run it. Every value is JSON, which is YAML.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path

import regex

from qlora_ops.tasks import metrics as M
from qlora_ops.tasks.core.config import (DataParams, EvalParams, GateParams, ModelParams, Params, ParamsError,
                                         RegistryParams, SplitParams)
from qlora_ops.tasks.data.prepare import FIELDS, DataError, detect_format, prepare
from qlora_ops.tasks.data.readers import columns_of
from qlora_ops.tasks.gates.gate import gain_bar
from qlora_ops.tasks.gates.paired import level, min_detectable_diff
from qlora_ops.tasks.gates.policy import PromotionPolicy, rows_needed
from qlora_ops.tasks.core.util import read_jsonl
from qlora_ops.tasks.core.config import load_params

# Column names people use for our fields, most specific first (first match wins).
ALIASES = {
    "instruction": ("instruction", "question", "query", "prompt", "task"),
    "input": ("input", "context"),
    "output": ("output", "answer", "response", "completion", "label", "target", "category", "class"),
    # prompt_completion without an instruction: classification-style {text, label}
    "prompt": ("prompt", "text", "sentence", "content", "document", "input"),
}
# Answers are labels when there are at most this many distinct ones, each short and seen several times.
MAX_LABELS, MAX_LABEL_CHARS, MAX_LABEL_WORDS, MIN_PER_LABEL = 50, 40, 4, 3
# The test fraction init chooses never exceeds MAX_TEST: beyond it training would lose too much of the data.
MAX_TEST = 0.4
# The hash split only gives about n * test rows: aim this much above the rows needed so it still has them.
SPLIT_SLACK = 1.05
MAX_VAL_ROWS = 500  # validation loss only tracks training: a few hundred rows are enough
DISCORDANCE = 0.10  # assumed share of rows where candidate and champion answer differently (as power_check)


def _first(names: list[str], wanted: tuple[str, ...], taken: set[str]) -> str | None:
    low = {n.lower(): n for n in names if n not in taken}
    return next((low[w] for w in wanted if w in low), None)


def detect(columns: list[str]) -> tuple[str, dict[str, str], bool]:
    """(format, data.columns mapping, guessed?) for a file with these columns; DataError if no shape fits."""
    fmt = detect_format(columns)
    need = [f for f in FIELDS[fmt] if f != "input"]
    if all(f in columns for f in need):
        return fmt, {}, False
    taken: set[str] = set()
    out = _first(columns, ALIASES["output"], taken)
    if out:
        taken.add(out)
        if ins := _first(columns, ALIASES["instruction"], taken):
            taken.add(ins)
            mapping = {"instruction": ins, "output": out}
            if inp := _first(columns, ALIASES["input"], taken):
                mapping["input"] = inp
            return "alpaca", {k: v for k, v in mapping.items() if k != v}, True
        if prompt := _first(columns, ALIASES["prompt"], taken):
            mapping = {"prompt": prompt, "completion": out}
            return "prompt_completion", {k: v for k, v in mapping.items() if k != v}, True
    raise DataError(f"cannot tell which columns hold the prompt and the answer (columns: {columns[:20]}); write the "
                    "params file by hand with data.format and data.columns, e.g. {instruction: question, output: answer} "
                    "(formats: alpaca instruction/input/output, chat messages, prompt_completion prompt/completion)")


def label_set(stats: dict) -> list[str] | None:
    """The answers as a label set, or None when they look like free text."""
    counts = stats.get("labels")
    if not counts or not 2 <= len(counts) <= MAX_LABELS:
        return None
    if any(len(a) > MAX_LABEL_CHARS or len(a.split()) > MAX_LABEL_WORDS for a in counts):
        return None
    if min(counts.values()) < MIN_PER_LABEL:  # each label seen several times: one seen once is free text
        return None
    return sorted(counts)


# Gate thresholds and promotion margins per gate metric, in its units (tasks/core/config.py GateParams and
# RegistryParams say what each key decides). exact_match keeps the defaults: they were set on it.
# Overlap metrics (0..1): a base model already scores 0.1-0.3 on free text by sharing common words, so a
# 20-point gain at the interval's lower bound (exact match's bar, where the base scores ~0) would refuse
# models that clearly learned the task (issue 16: token F1 0.196 -> 0.405); 5 points at the lower bound
# still needs a gain no noise explains. Merge fidelity is the mean per-row |merged - QLoRA| score: greedy
# decoding of a sentence can drift after one different token, so this is looser than it looks.
# nll is in nats per token (lower is better): the gain is a reduction.
GATES = {
    "exact_match": {"min_gain_over_base": 0.2, "max_merge_disagreement": 0.06, "non_inferiority_margin": 0.02,
                    "min_improvement": 0.01},
    "json_match": {"min_gain_over_base": 0.2, "max_merge_disagreement": 0.05, "non_inferiority_margin": 0.02,
                   "min_improvement": 0.01},
    **{m: {"min_gain_over_base": 0.05, "max_merge_disagreement": 0.05, "non_inferiority_margin": 0.02,
           "min_improvement": 0.01} for m in ("rouge_l", "token_f1", "chrf")},
    "nll": {"min_gain_over_base": 0.1, "max_merge_disagreement": 0.02, "non_inferiority_margin": 0.02,
            "min_improvement": 0.01},
}
FREE_TEXT_PROMPTS = {"json_match": "Answer with the JSON only.", "rouge_l": "Answer briefly, in the style of the examples.",
                     "chrf": "Answer briefly, in the style of the examples.",
                     "exact_match": "Answer with the answer only, exactly as in the examples."}
MIN_JSON = 0.5      # JSON answers above this share (a majority) make json_match; the others are named as outliers
MAX_NON_LATIN = 0.2  # answers written mostly in another script above this share: chrf
MIN_CODE = 0.5      # answers that look like code above this share: exact match (short) or chrf (long)
SHORT_CODE_CHARS = 40  # code answers this long or shorter (median) are one expression: right or wrong
_NUMBER = re.compile(r"[-+]?(\d[\d,_]*)?\.?\d+([eE][-+]?\d+)?%?")
# A call `f(x)`, an assignment or comparison, a statement end, braces, an arrow or a keyword opening a line.
_CODE = re.compile(r"\w\(|\s[-+*/%<>!=]?=\s|==|;\s*$|[{}]|->|=>|^\s*(def|class|import|from|return|lambda|SELECT|"
                   r"function|const|let|var|for|while|if)\b", re.M)


def _non_latin(a: str) -> bool:
    """Most of the answer's letters are outside the Latin script (Cyrillic, CJK, Arabic, ...)."""
    letters = regex.findall(r"\p{L}", a)
    return bool(letters) and sum(bool(regex.match(r"\p{Latin}", ch)) for ch in letters) < len(letters) / 2


def choose_metric(answers: list[str], labels: list[str] | None) -> tuple[str, str]:
    """(gate metric, why) for these reference answers; the why names what decided it."""
    n = max(len(answers), 1)
    if labels:
        return "exact_match", f"{len(labels)} labels: an answer is right or wrong, so exact match (accuracy)"
    js = [a for a in answers if _is_json(a)]
    if answers and len(js) / n > MIN_JSON:
        out = [a for a in answers if not _is_json(a)]
        named = ("; NOT JSON, fix or drop them before `check` passes: " + ", ".join(repr(a[:40]) for a in out[:5])
                 + (f" and {len(out) - 5} more" if len(out) > 5 else "")) if out else ""
        return "json_match", (f"{len(js)} of {len(answers)} answers are JSON objects/arrays: json_match scores valid "
                              f"JSON by the F1 of the reference's fields it gets right{named}")
    if answers and all(_NUMBER.fullmatch(a.strip()) for a in answers):
        return "exact_match", ("every answer is a number: -5 and 5 are different answers that word overlap (ROUGE-L) "
                               "scores alike, so exact match")
    if (code := sum(bool(_CODE.search(a)) for a in answers) / n) > MIN_CODE:
        med = sorted(len(a) for a in answers)[len(answers) // 2]
        if med <= SHORT_CODE_CHARS:
            return "exact_match", (f"{code:.0%} of answers look like code and they are short (median {med} chars): one "
                                   "changed operator (`a - b` vs `a + b`) makes a wrong answer, which ROUGE-L's word "
                                   "tokenizer cannot see (it drops symbols), so exact match")
        return "chrf", (f"{code:.0%} of answers look like code, median {med} chars: chrF's character n-grams keep the "
                        "operators and punctuation ROUGE-L drops, and give partial credit where an exact match of "
                        "whole programs would score almost every answer 0")
    if (other := sum(map(_non_latin, answers)) / n) > MAX_NON_LATIN:
        return "chrf", (f"free text, {other:.0%} of answers mostly in a non-Latin script: chrF (character n-grams) "
                        "needs no word splitting, so it scores every script, including those written without spaces")
    return "rouge_l", ("free-text answers: ROUGE-L gives partial credit for the longest run of reference words in "
                       "order (stemmed); exact match would score almost every answer 0")


def _is_json(a: str) -> bool:
    try:
        return isinstance(json.loads(a), (dict, list))
    except ValueError:
        return False


def split_for(n: int, policy: PromotionPolicy) -> tuple[float, float, str]:
    """(val, test, comment) for n distinct rows: the test fraction that gives the rows the promotion
    policy needs to tell a non_inferiority_margin difference, at most MAX_TEST.

    DISCORDANCE plays the per-row variance of the paired score difference (for 0/1 scores the two are
    the same number); a 0..1 overlap metric shaped like ROUGE-L has about that variance between two
    similar models, so the same sizing serves it (tasks.gates.paired's continuous path refines the power line)."""
    margin = min(policy.non_inferiority_margin, DISCORDANCE)
    need = rows_needed(policy, discordance=DISCORDANCE, regression=margin)
    test = min(math.ceil(10000 * SPLIT_SLACK * need / max(n, 1)) / 10000, MAX_TEST)
    val = 0.1 if n * 0.1 <= MAX_VAL_ROWS else max(math.floor(10000 * MAX_VAL_ROWS / n) / 10000, 0.0001)
    n_test = max(round(n * test), 1)
    floor = max(min_detectable_diff(n_test, discordance=DISCORDANCE, confidence=policy.confidence),
                policy.min_improvement)
    if n_test >= need:
        what = (f"enough to tell a {100 * margin:g}-point difference (needs ~{need}): the policy can promote a "
                f"candidate >= {100 * floor:.1f} points better")
    else:
        can = ("no candidate (no difference within that discordance is detectable)" if math.isinf(floor)
               else f"only a candidate >= {100 * floor:.1f} points better")
        what = (f"the policy can promote {can} and cannot tell a "
                f"{100 * margin:g}-point regression; that needs ~{need} test rows (more data)")
    comment = (f"test {test}: ~{n_test} of {n} rows (at {DISCORDANCE:.0%} discordance, 80% power, "
               f"{level(policy.confidence)} confidence): {what}")
    return val, test, comment


def _name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-").lower() or "data"


def _inside(path: Path, root: Path) -> str | None:
    rel = Path(os.path.relpath(path, root)).as_posix()
    return None if rel == ".." or rel.startswith("../") else rel


def system_prompt_for(fmt: str, labels: list[str] | None, metric: str) -> str | None:
    """The system prompt init writes (None: the rows' own, for chat data, or the default)."""
    if fmt == "chat":
        return None  # a chat row's own system turn wins
    if labels:  # naming the labels tells the base model what to answer
        return "Answer with one of: " + ", ".join(labels) + "." if len(labels) <= 20 else None
    return FREE_TEXT_PROMPTS[metric]  # the default system prompt asks for "the exact label": wrong for these answers


def measured_bar(g: dict, metric: str, base: dict | None) -> tuple[float, str]:
    """gates.min_gain_over_base for this data and the comment saying why: the metric's fixed bar, or half the
    headroom the base left on the validation rows where that is lower (the gate's own rule, gain_bar, floored
    to 2 decimals so the file reads plainly)."""
    fixed, m = g["min_gain_over_base"], M.get(metric)
    if base is None:
        return fixed, "the fixed bar for this metric (the base model was not measured: init --no-base-eval)"
    seen = f"the base model scored {base['mean']:.3f} {metric} on the {base['n']} validation rows (measured by init)"
    if m.hi == float("inf"):
        return fixed, seen + "; nll has no ceiling, so the fixed bar stays"
    bar, _ = gain_bar(GateParams(min_gain_over_base=fixed, min_gain_of_headroom=0.5), m, base["mean"])
    if bar >= fixed:
        return fixed, seen + f": the fixed bar {fixed:g} leaves it room to show a gain"
    bar = max(0.01, math.floor(bar * 100) / 100)
    return bar, seen + f": a gain of {fixed:g} would need more than half of what is left above it, so the bar is half its headroom"


def write_params(datafile: Path, workspace: Path, out: str | None = None, model: str | None = None,
                 force: bool = False, command: str | None = None, base_scorer=None) -> dict:
    """Detect, validate and write the params file; returns {path, text, format, columns, labels, stats,
    split, base}. DataError names bad rows (nothing written); ParamsError a refused --out. `base_scorer`
    (params, workspace, rows_path, out_dir, system_prompt) -> {mean, n, ...} measures the base model on the
    validation rows (tasks.evaluate.base_probe.score_base; None: the metric's fixed gain bar)."""
    ws = Path(workspace).resolve()
    data = Path(datafile).expanduser().resolve()
    if not data.exists():
        raise DataError(f"{datafile}: not found; pass a JSONL, CSV, Parquet or .arrow file or a datasets "
                        "save_to_disk directory")
    stem = data.stem if data.is_file() else data.name
    name = _name(Path(out).stem if out else stem)
    out_path = (ws / out) if out and not Path(out).is_absolute() else Path(out) if out else ws / "params" / f"{name}.yaml"
    out_rel = _inside(out_path.resolve(), ws)
    if out_rel is None:
        raise ParamsError(f"--out {out}: the params file must be inside the workspace {ws} (DVC reads it there); "
                          "use e.g. params/NAME.yaml")
    if out_path.exists() and not force:
        raise ParamsError(f"{out_rel}: already exists; pass --force to replace it or --out another name")

    # Format and columns: per file, and they must agree (one mapping serves every file).
    found = {}
    for unit, cols in columns_of(data):
        found[unit] = detect(cols)
    shapes = {(f, json.dumps(m, sort_keys=True)) for f, m, _ in found.values()}
    if len(shapes) > 1:
        listing = "; ".join(f"{u}: {f} {m or ''}".strip() for u, (f, m, _) in found.items())
        raise DataError(f"{data}: files of different shapes ({listing}); give them the same columns, or write "
                        "data.format: auto and data.columns by hand")
    fmt, columns, guessed = next(iter(found.values()))

    probe = Params(data=DataParams(raw=str(data), format=fmt, columns=columns))
    with tempfile.TemporaryDirectory(prefix="qlora-ops-init-") as tmp:
        # every bad row named here, as in a run; the split of this data alone (no params file has a lineage yet)
        stats = prepare(probe, ws, out=Path(tmp), lineage_aware=False)
        answers = [r["completion"] for split in ("train", "val", "test") for r in read_jsonl(Path(tmp) / f"{split}.jsonl")]
    n = stats["rows_after_dedupe"]
    labels = label_set(stats)
    metric, why = choose_metric(answers, labels)
    g = GATES[metric]
    policy = PromotionPolicy.from_registry(RegistryParams(non_inferiority_margin=g["non_inferiority_margin"],
                                                          min_improvement=g["min_improvement"]))
    val, test, split_note = split_for(n, policy)
    # The gate bars must be reachable on the test rows a run will really get: near-duplicate clusters move
    # whole groups between splits, so the share is not n * test. Split once more at the chosen fractions.
    sized = Params(data=DataParams(raw=str(data), format=fmt, columns=columns, split=SplitParams(val=val, test=test)))
    system = system_prompt_for(fmt, labels, metric)
    base = None
    with tempfile.TemporaryDirectory(prefix="qlora-ops-init-") as tmp:
        prepare(sized, ws, out=Path(tmp), lineage_aware=False)
        n_test = len(read_jsonl(Path(tmp) / "test.jsonl"))
        if base_scorer is not None and read_jsonl(Path(tmp) / "val.jsonl"):
            probe = Params(data=sized.data, model=ModelParams(source=model or ModelParams().source),
                           eval=EvalParams(metric=metric))
            base = base_scorer(probe, ws, Path(tmp) / "val.jsonl", Path(tmp) / "base-eval", system)
    bar = measured_bar(GATES[metric], metric, base)

    rel = _inside(data, ws)
    text = _render(out_rel, command or f"qlora-ops init {datafile}", name, data, rel, fmt, columns, guessed, labels,
                   stats, val, test, split_note, model or ModelParams().source, metric, why, n_test, system, bar)
    # The file must load as params before it is written: a bad value is our bug, not the user's to find.
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "p.yaml").write_text(text)
        load_params(Path(tmp, "p.yaml"))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    return {"path": out_rel, "text": text, "format": fmt, "columns": columns, "labels": labels, "stats": stats,
            "split": {"val": val, "test": test}, "note": split_note, "metric": metric, "base": base,
            "min_gain_over_base": bar[0]}


def _gate_lines(g: dict, m, n_test: int, bar: tuple[float, str]) -> list[str]:
    """The gates' thresholds, each with why (docs/gates.md, "One rule"): every gate decides on its test and a
    bound of its interval at 95%, so a bar must be reachable on this data's test rows."""
    merge = g["max_merge_disagreement"]
    if m.binary:  # the Clopper-Pearson upper bound with 0 differing rows on n_test rows
        merge = max(merge, math.ceil(100 * (1 - 0.025 ** (1 / n_test))) / 100)
    head = ["  # every gate decides on its paired test AND a bound of its 95% interval (docs/gates.md): the bars below "
            f"are what ~{n_test} test rows can show; where the base already scores well, half its headroom replaces "
            "the fixed gain bar"]
    return head + [f"  # {bar[1]}", f"  min_gain_over_base: {bar[0]}",
                   *(["  min_gain_of_headroom: 0.5"] if m.hi != float("inf") else []),
                   f"  max_merge_disagreement: {merge}"]


def _render(out_rel: str, command: str, name: str, data: Path, rel: str | None, fmt: str, columns: dict,
            guessed: bool, labels: list[str] | None, stats: dict, val: float, test: float, split_note: str,
            model: str, metric: str, why: str, n_test: int, system: str | None, bar: tuple[float, str]) -> str:
    j = json.dumps
    n = stats["rows_after_dedupe"]
    lines = [
        f"# Params for {rel or data} ({fmt}, {n} distinct rows), written by `{command}`. Run it with:",
        f"#   qlora-ops run --params {out_rel}",
        "# See what a run would do first (validates params and data, trains nothing):",
        f"#   qlora-ops check --params {out_rel}",
        "# Keys not written here keep their defaults (tasks/core/config.py; every key, commented: params/default.yaml).",
        "model:",
        f"  source: {j(model)}    # base model: smollm2-gguf (embedded) or a local HF model dir",
        "data:",
    ]
    if rel is not None:
        lines.append(f"  raw: {j(rel)}    # inside the workspace: each run `dvc add`s it (a new version when it changes)")
    else:
        lines += [f"  source: {j(str(data))}    # outside the workspace: each run snapshots it into data.raw",
                  f"  raw: {j('data/raw/' + name)}    # the DVC-tracked snapshot of data.source"]
    lines += [f"  prepared: {j('data/prepared/' + name)}",
              f"  format: {j(fmt)}    # detected from the columns"]
    if columns:
        why = "guessed from the column names: check them" if guessed else "your column names"
        lines.append(f"  columns: {j(columns)}    # {why}")
    if labels:
        lines.append(f"  labels: {j(labels)}    # {len(labels)} distinct short answers: any other answer is a bad row")
    else:
        lines.append("  labels: null    # free-text answers (too many distinct, long or unrepeated for a label set)")
    if system is not None:  # system_prompt_for says why
        lines.append(f"  system_prompt: {j(system)}")
    g, m = GATES[metric], M.get(metric)
    scale = "0..1" if m.hi == 1 else "nats per token, lower is better"
    lines += [f"  # {split_note}",
              f"  split: {{val: {val}, test: {test}, seed: 42}}",
              f"# {why}. The gates and the promotion margins below are in {metric} units ({scale}).",
              "eval:",
              f"  metric: {metric}",
              "gates:",
              *_gate_lines(g, m, max(n_test, 1), bar),
              "registry:",
              f"  model_name: {j('qlora-ops-' + name)}    # its own registered model: its champion competes with no other data set",
              f"  non_inferiority_margin: {g['non_inferiority_margin']}",
              f"  min_improvement: {g['min_improvement']}",
              ""]
    return "\n".join(lines)
