"""Data stage: validation that fails loudly, dedupe, hash split, prompt format.

    python -m qlora_ops.tasks.data sample --out data/raw/stdlib_docstrings.jsonl   # dvc.yaml stage `sample` (tasks/data/samples.py)
    python -m qlora_ops.tasks.data prepare --params params/default.yaml            # dvc.yaml stage `prepare`

Raw data is a JSONL, CSV, Parquet or `datasets` .arrow file, a `save_to_disk` directory, or a directory
(the snapshot of data.source) of any of them. Rows are alpaca {"instruction", "input" (optional),
"output"}, chat {"messages": OpenAI-style turns} or {"prompt", "completion"} (data.format, auto-detected
per file; data.columns maps other column names). Every bad row is reported as file:line (JSONL) or
file:row (CSV/Parquet/Arrow, row 1 = the first data row) -- all of them in one error, the first
MAX_LISTED listed with the count -- and nothing is written; no row is ever skipped silently. Validated
rows go to a memory-mapped Arrow file (datasets), which prepare streams: large data never sits in
Python lists. The prepared splits keep one format whatever came in: {id, system, prompt, completion}.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

from qlora_ops.tasks.core.config import FORMAT_FIELDS, DataParams, Params
from qlora_ops.tasks.core.paths import ws_path
# The readers (one event stream per data file) live in tasks/data/readers.py; DataError is re-exported:
# callers know it as tasks.data.prepare's.
from qlora_ops.tasks.data.readers import _BATCH, _READERS, FIX, DataError, _is_saved, _units
from qlora_ops.tasks.core.util import atomic_open, atomic_write_json
from qlora_ops.tasks.data.text import cut_at_word as _cut, jsonl as _jsonl, sha256_text as _sha
from qlora_ops.tasks.data import lineage
from qlora_ops.tasks.data.dedupe import normalise
from qlora_ops.tasks.data.split import assign, row_key


# ---------------------------------------------------------------- row shapes (data.format, data.columns)
# Our field names per row shape; data.columns maps them to yours. tasks/core/config.py checks the same table.
FIELDS = FORMAT_FIELDS
TABLE_FIX = ('.csv/.parquet files need columns "instruction" and "output" (non-empty strings) and optionally "input"; '
             'a .csv row number counts data rows: row 1 is the first row after the header')
CHAT_FIX = ('each row needs "messages": a list of {"role": "system"|"user"|"assistant", "content": str}, an optional '
            'system turn first, ending with a user turn then the assistant turn (the answer); see README "Your own data"')
PC_FIX = 'each row needs "prompt" and "completion" (non-empty strings); see README "Your own data"'
COLUMNS_FIX = "columns named otherwise: map them with data.columns, e.g. {instruction: question, output: answer}"
MAX_LISTED = 20
ROLES = ("system", "user", "assistant")
_ABSENT = object()  # a key not in the row (JSONL), as opposed to a null value


def detect_format(columns, mapping: dict[str, str] | None = None) -> str:
    """The row shape a file with these column names (JSONL: keys) has, after data.columns: `messages` ->
    chat; prompt/completion without instruction/output -> prompt_completion; else alpaca (so a file with
    none of them is reported as missing "instruction"/"output", the documented default shape)."""
    have, col = set(map(str, columns)), (lambda f: (mapping or {}).get(f, f))
    if col("messages") in have:
        return "chat"
    if ({col("prompt"), col("completion")} & have) and not ({col("instruction"), col("output")} & have):
        return "prompt_completion"
    return "alpaca"


def _listed(shown: list[str], total: int | None = None) -> str:
    total = len(shown) if total is None else total
    more = f"\n  ... and {total - MAX_LISTED} more" if total > MAX_LISTED else ""
    return "\n  " + "\n  ".join(shown[:MAX_LISTED]) + more


def _text(content) -> str | None:
    """A message's content as text: a string, or OpenAI's list of {"type": "text", "text": str} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
            isinstance(p, dict) and p.get("type", "text") == "text" and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    return None


def _chat(msgs) -> tuple[dict | None, list[str]]:
    """A `messages` list -> (instruction, input, output, system), or what is wrong with it.

    The last assistant turn is the answer and the user turn before it the input. A system turn (first
    only) is that row's system prompt: it overrides data.system_prompt, as the data's author wrote it
    for that conversation. Earlier turns of a longer conversation go before the input as plain text,
    since the prepared rows hold one prompt (nothing downstream changes)."""
    if not isinstance(msgs, list) or not msgs:
        return None, [f'"messages" must be a non-empty list of {{"role", "content"}} turns (got {msgs!r:.40})']
    bad, turns = [], []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            bad.append(f'messages[{i}] is a {type(m).__name__}, not {{"role", "content"}}')
            continue
        role, text = m.get("role"), _text(m.get("content"))
        if role not in ROLES:
            bad.append(f"messages[{i}]: role {role!r:.30} (allowed: {', '.join(ROLES)})")
        elif role == "system" and i:
            bad.append(f"messages[{i}]: a system turn must be the first turn")
        if text is None:
            bad.append(f'messages[{i}]: "content" must be a string (or a list of text parts)')
        elif role in ("user", "assistant") and not text.strip():
            bad.append(f"messages[{i}]: empty {role} turn")
        turns.append((role, text))
    if bad:
        return None, bad
    if turns[-1][0] != "assistant":
        return None, [f"the last turn must be the assistant's answer (got a {turns[-1][0]} turn)"]
    if len(turns) < 2 or turns[-2][0] != "user":
        return None, ["the assistant's answer must follow a user turn"]
    system = turns[0][1] if turns[0][0] == "system" else None
    history = turns[1 if system is not None else 0:-2]
    head = ("Earlier in this conversation:\n\n" + "\n\n".join(f"{r.capitalize()}: {t.strip()}" for r, t in history)
            if history else "")
    return {"instruction": head, "input": turns[-2][1], "output": turns[-1][1], "system": system}, []


def _row(fmt: str, obj, d: DataParams, table: bool) -> tuple[dict | None, list[str]]:
    """One raw record -> {instruction, input, output, system}, or every problem with it (one line each).
    prompt_completion rows have instruction "" and the prompt as input (so data.max_input_chars cuts it)."""
    if not isinstance(obj, dict):
        return None, [f"a JSON {type(obj).__name__}, not an object"]
    cols = d.columns

    def get(field):
        v = obj.get(cols.get(field, field), _ABSENT)
        return None if table and _missing(v) else v

    def q(field):  # the name as the user wrote it, and which params key maps it
        return f'"{cols[field]}" (data.columns.{field})' if field in cols else f'"{field}"'

    bad: list[str] = []

    def text(field, optional=False):
        v = get(field)
        if v is _ABSENT or (optional and v is None and table):
            if not optional:
                bad.append(f"missing {q(field)}")
            return ""
        if optional:
            if not isinstance(v, str):
                bad.append(f"{q(field)} must be a string (got {type(v).__name__})")
            return v
        if not isinstance(v, str) or not v.strip():
            bad.append(f"{q(field)} must be a non-empty string (got {v!r:.40})")
        return v

    if fmt == "chat":
        msgs = get("messages")
        if msgs is _ABSENT:
            return None, [f"missing {q('messages')}"]
        if table and isinstance(msgs, str):  # a CSV cell holds the list as JSON text
            try:
                msgs = json.loads(msgs)
            except (json.JSONDecodeError, RecursionError):
                return None, [f"{q('messages')} is not a JSON list of turns"]
        row, bad = _chat(msgs)
    elif fmt == "prompt_completion":
        row = {"instruction": "", "input": text("prompt"), "output": text("completion"), "system": None}
    else:
        row = {"instruction": text("instruction"), "input": text("input", optional=True), "output": text("output"),
               "system": None}
    if not bad and d.labels is not None and row["output"].strip() not in {x.strip() for x in d.labels}:
        shown = ", ".join(d.labels[:10]) + (", ..." if len(d.labels) > 10 else "")
        bad.append(f"answer {row['output'].strip()!r:.60} is not one of data.labels ({shown}); fix the row or add "
                   "the label to data.labels")
    return (None, bad) if bad else (row, [])


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and v != v)  # None, NaN (pandas' missing value)


# ---------------------------------------------------------------- loading: validate into Arrow
# The validated rows go to one Arrow file, memory-mapped by `datasets`: prepare then streams them, so a
# large data set never sits in Python lists. JSONL is parsed here line by line rather than with datasets'
# JSON loader, which names no line for a bad one and fails on a column whose type differs between rows
# (an unused "meta" field), which is not an error in our data.
_SCHEMA = (("instruction", "string"), ("input", "string"), ("output", "string"), ("system", "string"),
           ("file", "string"), ("line", "int64"))


def open_rows(path: Path, d: DataParams, tmp: Path):
    """Validated rows under `path` as a memory-mapped `datasets.Dataset` with columns instruction, input,
    output, system (a chat row's own system turn, else None), file, line; plus {unit name: format}.

    `line` is the JSONL line, or the CSV/Parquet/Arrow data row (1 = the first row after the header).
    Raises DataError naming every bad line/row as file:n (up to MAX_LISTED, with the count) before anything
    else happens. `tmp` holds the Arrow file and must outlive the dataset."""
    import datasets
    import pyarrow as pa

    path = Path(path)
    units = _units(path)
    schema = pa.schema([(k, getattr(pa, t)()) for k, t in _SCHEMA])
    shown, count, bad_units, formats, fixes, rows = [], 0, 0, {}, set(), 0
    out = Path(tmp) / "rows.arrow"

    def add(msg: str) -> None:
        nonlocal count
        count += 1
        if len(shown) < MAX_LISTED:
            shown.append(msg)

    with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        buf: list[dict] = []
        for name, p, kind in units:
            fmt = None if d.format == "auto" else d.format
            table = kind != "jsonl"
            before = count
            for ev in _READERS[kind](p, fmt is None):
                if ev[0] == "columns":
                    fmt = fmt or detect_format(ev[1], d.columns)
                    need = [d.columns.get(f, f) for f in FIELDS[fmt] if f != "input"]
                    if table and (absent := [c for c in need if c not in ev[1]]):
                        add(f"{name}: no column {' or '.join(repr(c) for c in absent)} (columns: {ev[1][:20]}); "
                            f"name the columns {', '.join(FIELDS[fmt])}" + (" (input optional)" if fmt == "alpaca" else "")
                            + f", or map yours with data.columns (e.g. {{{FIELDS[fmt][0]}: your_column}})")
                        break
                elif ev[0] == "file":
                    add(f"{name}: {ev[1]}")
                    break
                elif ev[0] == "bad":
                    add(f"{name}:{ev[1]}: {ev[2]}")
                else:
                    row, bad = _row(fmt or "alpaca", ev[2], d, table)
                    if bad:
                        add(f"{name}:{ev[1]}: " + "; ".join(bad))
                        continue
                    buf.append({**row, "file": name, "line": ev[1]})
                    rows += 1
                    if len(buf) >= _BATCH:
                        writer.write_batch(pa.RecordBatch.from_pylist(buf, schema))
                        buf = []
            fmt = fmt or (d.format if d.format != "auto" else "alpaca")
            formats[name] = fmt
            if count > before:
                bad_units += 1
                fixes.add((fmt, table))
        if buf:
            writer.write_batch(pa.RecordBatch.from_pylist(buf, schema))
    kinds = {k != "jsonl" for _, _, k in units}
    fix = _fix(fixes or {(f, k != "jsonl") for (_, _, k), f in zip(units, formats.values())}, d)
    if count:
        what = {frozenset([False]): "line(s)", frozenset([True]): "row(s)"}.get(frozenset(kinds), "line(s)/row(s)")
        where = f" in {bad_units} of {len(units)} files" if len(units) > 1 or path.is_dir() and not _is_saved(path) else ""
        raise DataError(f"{path}: {count} bad {what}{where} ({fix}):" + _listed(shown, count))
    if not rows:
        raise DataError(f"{path}: no rows (the file{'s are' if len(units) > 1 else ' is'} empty); {fix}")
    return datasets.Dataset.from_file(str(out)), formats


def _fix(which: set[tuple[str, bool]], d: DataParams) -> str:
    parts = []
    for fmt, table in sorted(which):
        parts.append({"chat": CHAT_FIX, "prompt_completion": PC_FIX}.get(fmt) or (TABLE_FIX if table else FIX))
    if not d.columns:
        parts.append(COLUMNS_FIX)
    return "; ".join(dict.fromkeys(parts))


def load_raw(path: Path, data: DataParams | None = None) -> list[dict]:
    """Validated rows {instruction, input, output, system, line, file} from one data file or a directory
    of them, as a list (small data, tests, tools); prepare streams them instead (open_rows).

    Raises DataError listing every bad line/row as file:n before anything else happens."""
    with tempfile.TemporaryDirectory(prefix="qlora-ops-rows-") as tmp:
        ds, _ = open_rows(Path(path), data or DataParams(), Path(tmp))
        rows = ds.to_list()
        del ds  # the memory map must close before the directory goes
    return rows


def prepared_rows(path: Path, d: DataParams, limit: int | None = None) -> list[dict]:
    """Rows under `path` in the prepared splits' shape {id, system, prompt, completion}, in file order,
    validated and formatted exactly as prepare does (an extra evaluation suite, tasks/evaluate/suites.py); no
    dedupe, no split. Ids are prepare's (hash of the prompt), numbered when a prompt repeats."""
    out, seen = [], Counter()
    with tempfile.TemporaryDirectory(prefix="qlora-ops-rows-") as tmp:
        ds, _ = open_rows(Path(path), d, Path(tmp))
        try:
            for r in _rows(ds, list(range(min(limit, len(ds)))) if limit else None):
                prompt, completion, system, key, _ = _example(r, d)
                ex_id = _sha(key)[:16]
                seen[ex_id] += 1
                out.append({"id": ex_id if seen[ex_id] == 1 else f"{ex_id}-{seen[ex_id]}", "system": system,
                            "prompt": prompt, "completion": completion})
        finally:
            del ds
    return out


# ---------------------------------------------------------------- prepare
def _full(r: dict) -> str:
    """The row's normalised full prompt (its own system turn, instruction, uncut input): what the split's
    clusters and the test-set lineage compare (tasks/data/dedupe.py, tasks/data/lineage.py)."""
    return normalise("\n".join(p for p in (r["system"] or "", r["instruction"], r["input"]) if p))


def is_correction(name: str) -> bool:
    """A corrections file (`*.corrections.jsonl`, or any data file under a `corrections/` folder): its rows
    replace earlier rows with the same prompt instead of conflicting with them (README "Corrections")."""
    p = Path(name)
    return ".corrections." in p.name or p.parent.name == "corrections"


def _example(r: dict, d: DataParams) -> tuple[str, str, str, str, bool]:
    """(prompt, completion, system, key, input truncated) of one validated row."""
    inp = r["input"].strip()
    cut = len(inp) > d.max_input_chars
    if cut:
        inp = _cut(inp, d.max_input_chars)
    prompt = "\n\n".join(p for p in (r["instruction"].strip(), inp) if p)
    # Whitespace-insensitive key: dedupe, conflicts, split and id all agree on what "the same prompt" is.
    # A row's own system prompt (chat) is part of it: the same question under two system prompts may
    # rightly have two answers.
    key = " ".join(prompt.split())
    if r["system"] is not None:
        key = " ".join(r["system"].split()) + "\0" + key
    return prompt, r["output"].strip(), d.system_prompt if r["system"] is None else r["system"], key, cut


def _rows(ds, indices=None):
    """Rows of a dataset (or of its `indices`, in that order) as dicts, a batch at a time."""
    sub = ds if indices is None else ds.select(indices)
    for batch in sub.iter(batch_size=_BATCH):
        cols = list(batch)
        for rec in zip(*(batch[c] for c in cols)):
            yield dict(zip(cols, rec))


def prepare(params: Params, workspace: Path, out: Path | None = None, lineage_aware: bool = True) -> dict:
    """Validate -> dedupe -> cluster split (pinned by the test-set lineage) -> prompt format; write
    train/val/test JSONL + stats.json into data.prepared and update the lineage file (or write to `out`
    only, lineage untouched: `qlora-ops check` and the flow's check before `dvc repro`). lineage_aware=False:
    a split of the data alone (`init`, sizing a params file that has no lineage yet)."""
    d = params.data
    raw = ws_path(workspace, d.raw)
    lin_file = lineage.lineage_path(Path(workspace), params) if lineage_aware else None
    if lineage_aware:
        lineage.adopt(Path(workspace), params)  # before DVC deletes the copy: a new state dir takes it
    copy = lineage.copy_path(Path(workspace), d) if out is None else None
    with tempfile.TemporaryDirectory(prefix="qlora-ops-rows-") as tmp:
        ds, formats = open_rows(raw, d, Path(tmp))
        try:
            stats = _prepare(ds, formats, params, raw, ws_path(workspace, d.prepared) if out is None else Path(out),
                             lin_file, write_lineage=out is None, copy=copy)
        finally:
            del ds
    return stats


MAX_LABELS = 1000  # distinct answers counted in stats.json; beyond that they are free text (labels: null)


def _corrections(ds, d: DataParams) -> dict[str, int]:
    """{prompt key hash: row index} of the last corrections-file row of each prompt (files in name order):
    that row replaces every other row with the prompt."""
    fixes: dict[str, int] = {}
    for i, r in enumerate(_rows(ds)):
        if is_correction(r["file"]):
            fixes[_sha(_example(r, d)[3])] = i
    return fixes


def _prepare(ds, formats: dict[str, str], params: Params, raw: Path, out: Path, lin_file: Path | None = None,
             write_lineage: bool = False, copy: Path | None = None) -> dict:
    d = params.data
    fixes = _corrections(ds, d)
    replaced = 0
    # Only hashes and row indices are kept per row; the text stays in the memory-mapped Arrow file.
    first: dict[str, tuple[str, int]] = {}  # key hash -> (completion hash, row index) of its first row
    kept: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    rows: list[tuple[str, int, str, str]] = []  # (id, row index, exact key, normalised full prompt)
    conflicts: list[tuple[int, int]] = []
    seen_ids: Counter = Counter()
    labels: Counter | None = Counter()
    n_rows, n_kept, dropped, truncated = 0, 0, 0, 0
    for i, r in enumerate(_rows(ds)):
        n_rows += 1
        prompt, completion, _, key, cut = _example(r, d)
        truncated += cut
        kh = _sha(key)
        if kh in fixes and fixes[kh] != i:
            replaced += 1  # superseded by the last corrections row (files in name order) for the same prompt
            continue
        if (prev := first.get(kh)) is None:
            first[kh] = (_sha(completion), i)
        else:
            if prev[0] != _sha(completion):
                conflicts.append((prev[1], i))
                continue
            if d.dedupe:
                dropped += 1
                continue
        n_kept += 1
        ex_id = kh[:16]
        seen_ids[ex_id] += 1
        if seen_ids[ex_id] > 1:  # only with dedupe=false; ids stay unique
            ex_id += f"-{seen_ids[ex_id]}"
        rows.append((ex_id, i, key, _full(r)))
        if labels is not None:
            labels[completion] += 1
            if len(labels) > MAX_LABELS:
                labels = None
    if conflicts:
        shown = []
        for a, b in conflicts[:MAX_LISTED]:
            ra, rb = ds[a], ds[b]
            shown.append(f"{ra['file']}:{ra['line']} and {rb['file']}:{rb['line']}: the same prompt has two different "
                         f"outputs ({ra['output'].strip()!r} vs {rb['output'].strip()!r})")
        why = (f" (inputs are cut to data.max_input_chars={d.max_input_chars}, which can make two long inputs equal)"
               if truncated else "")
        raise DataError(f"{raw}: {len(conflicts)} conflicting duplicate(s){why}; fix or remove one line of each pair:"
                        + _listed(shown, len(conflicts)))
    # data.split.seed, not the training seed: another training seed never moves rows between splits. A
    # near-duplicate cluster (duplicates kept by dedupe=false included) lives in one split: no leak.
    lin = lineage.load(lin_file) if lin_file is not None else lineage.empty()
    names, split_info = assign([(k, t) for _, _, k, t in rows], d, lin)
    lineage.refuse_moves(lin, d, split_info["moved"], lin_file)
    for (ex_id, i, _, _), name in zip(rows, names):
        kept[name].append((ex_id, i))
    sizes = {k: len(v) for k, v in kept.items()}
    if min(sizes.values()) == 0 or sizes["train"] < 8:
        raise DataError(f"{raw}: {n_kept} rows give splits {sizes}; every split needs rows and train "
                        f"needs >= 8: add data or change data.split (val/test fractions) in the params file")

    for name, pairs in kept.items():
        pairs.sort()
        _write_split(out / f"{name}.jsonl", ds, pairs, d)
    root = raw if raw.is_dir() else raw.parent
    stats = {"rows_raw": n_rows, "rows_after_dedupe": n_kept, "duplicates_dropped": dropped, **sizes,
             # Inputs cut to data.max_input_chars: never silent, it changes what the model sees.
             "inputs_truncated": truncated, "max_input_chars": d.max_input_chars,
             # Relative names: stats.json is a DVC output, the same wherever the workspace lives.
             "formats": {Path(os.path.relpath(k, root)).as_posix(): v for k, v in sorted(formats.items())},
             "labels": dict(sorted(labels.items())) if labels is not None else None,
             # rows of a corrections file, and the earlier rows they replaced (README "Corrections")
             "corrections": {"rows": len(fixes), "replaced": replaced},
             # test rows whose near-duplicate cluster was ever trained on: must be 0 to promote
             "lineage": lin["lineage"], "contamination": split_info["contamination"],
             "near_duplicate_rows": split_info["near_duplicate_rows"]}
    atomic_write_json(out / "stats.json", stats)
    if write_lineage and lin_file is not None:  # last: a failed prepare never records its split
        lin = lineage.record(lin, d, {row_key(t): (name, t) for (_, _, _, t), name in zip(rows, names)})
        lineage.save(lin_file, lin)
        if copy is not None:  # the versioned copy (a DVC output): seeds a state dir that lost the live file
            lineage.save(copy, lin)
    return stats


def _write_split(path: Path, ds, pairs: list[tuple[str, int]], d: DataParams) -> None:
    """One split as JSONL, streamed to a temp file then renamed (readers never see half a file)."""
    with atomic_open(path) as f:
        rows = _rows(ds, [i for _, i in pairs]) if pairs else iter(())
        for (ex_id, _), r in zip(pairs, rows):
            prompt, completion, system, _, _ = _example(r, d)
            f.write(_jsonl([{"id": ex_id, "system": system, "prompt": prompt, "completion": completion}]))
