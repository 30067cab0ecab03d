"""Data stage: the sample dataset, validation that fails loudly, dedupe, hash split, prompt format.

    python -m tasks.data sample --out data/raw/stdlib_docstrings.jsonl   # dvc.yaml stage `sample`
    python -m tasks.data prepare --params params/default.yaml            # dvc.yaml stage `prepare`

Raw data is alpaca-style JSONL: {"instruction": str, "input": str (optional), "output": str}, or a
directory (the snapshot of data.source) of JSONL, CSV and Parquet files with those columns.
Every bad line is reported as file:line (CSV/Parquet: file:row, row 1 = the first data row) -- all
of them, up to a limit -- and nothing is written; no row is ever skipped silently.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import sys
import sysconfig
import warnings
from collections import Counter
from pathlib import Path

from tasks.config import Params, ParamsError, load_params
from tasks.paths import ws_path
from tasks.util import atomic_write_json, atomic_write_text


class DataError(ValueError):
    """Bad raw data: the message names file:line, what is wrong and how to fix it."""


def _sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def _jsonl(rows: list[dict]) -> str:
    # ensure_ascii: U+2028, U+0085 etc. come out escaped, so even a reader that splits with
    # str.splitlines() can never cut a row in two.
    return "".join(json.dumps(r) + "\n" for r in rows)


# ---------------------------------------------------------------- sample: stdlib docstrings
# Pure-Python packages/modules of every CPython >= 3.11, each with >= 100 usable docstrings carrying
# domain cues, and none that distros split into an optional package (turtle/tkinter, venv, distutils).
SAMPLE_MODULES = ["asyncio", "email", "http", "importlib", "logging", "tarfile", "unittest", "xml"]
PER_MODULE = 60  # the same cap for every module: balanced classes
SENTENCE_CHARS = 160
INSTRUCTION = "Which Python stdlib module is this docstring from?"  # the same for every row; README uses it


def _sources(module: str) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    if (root / module).is_dir():  # a package: every .py below it, its own tests excluded
        return sorted(p for p in (root / module).rglob("*.py")
                      if not {"test", "tests", "idle_test"} & set(p.relative_to(root).parts[:-1])
                      and not p.name.startswith("test"))
    if (root / f"{module}.py").is_file():
        return [root / f"{module}.py"]
    raise DataError(f"{root}: no source for stdlib module {module!r} (this Python ships without stdlib .py "
                    f"files?); build the sample with a full CPython install or point data.raw at your own data")


def _first_sentence(doc: str, limit: int = SENTENCE_CHARS) -> str:
    para = " ".join(doc.strip().split("\n\n")[0].split())
    m = re.match(r"(.+?[.!?])(\s|$)", para)
    return _cut(m.group(1) if m else para, limit)


def _cut(s: str, limit: int) -> str:
    """s cut to <= limit chars at a whitespace boundary (hard cut if one word is longer than limit)."""
    if len(s) <= limit:
        return s
    head = s[:limit + 1]  # +1: a cut exactly before a space keeps the last whole word
    m = re.match(r"(.*\S)\s", head, re.S)
    return m.group(1) if m else s[:limit]


def _docstrings(path: Path) -> list[tuple[str, str]]:
    with warnings.catch_warnings():  # a newer stdlib may trip a SyntaxWarning; parsing still works
        warnings.simplefilter("ignore")
        tree = ast.parse(path.read_bytes(), filename=str(path))  # parse, never import: no side effects
    return [(node.name, doc) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and (doc := ast.get_docstring(node))]


def sample_rows() -> list[dict]:
    by_mod: dict[str, set[str]] = {}
    for mod in SAMPLE_MODULES:
        by_mod[mod] = set()
        for src in _sources(mod):
            for name, doc in _docstrings(src):
                s = _first_sentence(doc)
                low = s.lower()
                # Too short to carry a cue, just the name, or names a label (leaks it or misleads): dropped, not masked.
                if len(s) < 25 or low.strip(".") == name.lower() or any(m in low for m in SAMPLE_MODULES):
                    continue
                by_mod[mod].add(s)
    # A sentence found in two modules has no single right answer (prepare would reject it as a conflict).
    count = Counter(s for ss in by_mod.values() for s in ss)
    rows = []
    for mod, ss in by_mod.items():
        cands = sorted((s for s in ss if count[s] == 1), key=_sha)  # stable choice: hash order, not random
        if len(cands) < PER_MODULE:
            raise DataError(f"stdlib module {mod} yields only {len(cands)} usable docstrings (< {PER_MODULE}); "
                            f"change SAMPLE_MODULES in tasks/data.py")
        rows += [{"instruction": INSTRUCTION, "input": s, "output": mod} for s in cands[:PER_MODULE]]
    rows.sort(key=lambda r: _sha(r["input"] + "\0" + r["output"]))  # interleave labels, deterministically
    return rows


def build_sample(out: Path) -> int:
    rows = sample_rows()
    atomic_write_text(Path(out), _jsonl(rows))
    return len(rows)


# ---------------------------------------------------------------- validation
FIX = 'each line must be a JSON object {"instruction": str, "input": str (optional), "output": str}; see README "Your own data"'
MAX_LISTED = 20


def _listed(errors: list[str]) -> str:
    more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
    return "\n  " + "\n  ".join(errors[:MAX_LISTED]) + more


def _line_errors(obj) -> list[str]:
    if not isinstance(obj, dict):
        return [f"a JSON {type(obj).__name__}, not an object"]
    bad = []
    for key in ("instruction", "output"):
        if key not in obj:
            bad.append(f'missing "{key}"')
        elif not isinstance(obj[key], str) or not obj[key].strip():
            bad.append(f'"{key}" must be a non-empty string (got {obj[key]!r:.40})')
    if "input" in obj and not isinstance(obj["input"], str):
        bad.append(f'"input" must be a string (got {type(obj["input"]).__name__})')
    return bad


DATA_SUFFIXES = (".jsonl", ".csv", ".parquet")  # what a raw directory (a data.source snapshot) may hold
TABLE_FIX = ('.csv/.parquet files need columns "instruction" and "output" (non-empty strings) and optionally "input"; '
             'a .csv row number counts data rows: row 1 is the first row after the header')


def is_data_name(name: str) -> bool:
    return name.lower().endswith(DATA_SUFFIXES)


def data_files(directory: Path) -> list[Path]:
    """The data files of a raw directory at any depth, sorted by relative name; paths with a part starting
    with "." or "_" are not data (editor temp files, `_SUCCESS`), as in tasks.sources.snapshot."""
    directory = Path(directory)
    found = []
    for p in directory.rglob("*"):
        rel = p.relative_to(directory)
        if p.is_file() and is_data_name(p.name) and not any(part.startswith((".", "_")) for part in rel.parts):
            found.append((rel.as_posix(), p))
    return [p for _, p in sorted(found)]


def _jsonl_rows(path: Path, rows: list[dict], errors: list[str]) -> None:
    # Split on b"\n" only: str.splitlines() would also split inside a row at U+2028, \x85, \x0c ...
    for n, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        where = f"{path}:{n}"
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # tolerate a BOM, as editors write one
        except UnicodeDecodeError as e:
            errors.append(f"{where}: not UTF-8 (byte {e.start + 1}); re-save the file as UTF-8")
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        if bad := _line_errors(obj):
            errors.append(f"{where}: " + "; ".join(bad))
            continue
        rows.append({"instruction": obj["instruction"], "input": obj.get("input", ""), "output": obj["output"],
                     "line": n, "file": str(path)})


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and v != v)  # None, NaN (pandas' missing value)


def _table_rows(path: Path, rows: list[dict], errors: list[str]) -> None:
    """CSV (every cell read as text; an empty cell is "") or Parquet (typed; a null is a missing value).
    Row n = the n-th data row (CSV: after the header)."""
    import pandas as pd  # only when a table is read: `python -m tasks.data` stays fast for JSONL

    csv = path.suffix.lower() == ".csv"
    try:
        with warnings.catch_warnings():
            # A row longer than the header would silently lose cells (or become the index): an error here.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = (pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig", index_col=False)
                  if csv else pd.read_parquet(path))
    except UnicodeDecodeError as e:
        errors.append(f"{path}: not UTF-8 (byte {e.start + 1}); re-save the file as UTF-8")
        return
    except pd.errors.EmptyDataError:
        return  # an empty file holds no rows (checked for the whole data set below)
    except Exception as e:  # pandas/pyarrow raise many types for a malformed file; all mean the same here
        what = "CSV" if csv else "Parquet"
        errors.append(f"{path}: not a readable {what} file ({type(e).__name__}: {str(e).strip()[:300]}); "
                      f"re-export it as {what}" + (" (quote cells that hold commas, quotes or line breaks)" if csv else ""))
        return
    cols = [str(c) for c in df.columns]
    if absent := [c for c in ("instruction", "output") if c not in cols]:
        errors.append(f"{path}: no column {' or '.join(repr(c) for c in absent)} (columns: {cols}); "
                      "name the columns instruction, input (optional), output")
        return
    keep = [c for c in ("instruction", "input", "output") if c in cols]
    for n, rec in enumerate(df[keep].to_dict("records"), start=1):
        # A null input means "no input"; a null instruction/output is reported as such.
        obj = {k: (None if _missing(v) else v) for k, v in rec.items() if k != "input" or not _missing(v)}
        if bad := _line_errors(obj):
            errors.append(f"{path}:{n}: " + "; ".join(bad))
            continue
        rows.append({"instruction": obj["instruction"], "input": obj.get("input", ""), "output": obj["output"],
                     "line": n, "file": str(path)})


def load_raw(path: Path) -> list[dict]:
    """Validated rows {instruction, input, output, line, file} from one data file or a directory of them.

    A directory (the snapshot of data.source) is every *.jsonl, *.csv, *.parquet in it, in sorted order.
    `line` is the JSONL line, or the CSV/Parquet data row (1 = the first row after the header).
    Raises DataError listing every bad line/row as file:n before anything else happens."""
    path = Path(path)
    if path.is_dir():
        files = data_files(path)
        if not files:
            raise DataError(f"{path}: no *.jsonl, *.csv or *.parquet file in this directory; put your data there "
                            f"(or point data.raw / data.source at it); {FIX}")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{path}: raw data file not found (set data.raw in your params file to an existing JSONL, "
                        f"CSV or Parquet file, or a directory of them)")
    rows, errors, bad_files = [], [], 0
    for f in files:
        before = len(errors)
        (_jsonl_rows if f.suffix.lower() not in (".csv", ".parquet") else _table_rows)(f, rows, errors)
        bad_files += len(errors) > before
    tables = any(f.suffix.lower() in (".csv", ".parquet") for f in files)
    jsonl = any(f.suffix.lower() not in (".csv", ".parquet") for f in files)
    fix = "; ".join(([FIX] if jsonl else []) + ([TABLE_FIX] if tables else []))
    if errors:
        what = "line(s)" if not tables else "row(s)" if not jsonl else "line(s)/row(s)"
        where = f" in {bad_files} of {len(files)} files" if path.is_dir() else ""
        raise DataError(f"{path}: {len(errors)} bad {what}{where} ({fix}):" + _listed(errors))
    if not rows:
        raise DataError(f"{path}: no rows (the file{'s are' if len(files) > 1 else ' is'} empty); {fix}")
    return rows


# ---------------------------------------------------------------- prepare
def _bucket(seed: int, key: str) -> float:
    """[0, 1) from a hash of the prompt alone: adding rows never moves old rows between splits."""
    return int(_sha(f"{seed}:{key}")[:12], 16) / 16 ** 12


def prepare(params: Params, workspace: Path) -> dict:
    """Validate -> dedupe -> hash split -> prompt format; write train/val/test JSONL + stats.json."""
    d = params.data
    raw = ws_path(workspace, d.raw)
    rows = load_raw(raw)
    first: dict[str, dict] = {}  # normalized prompt -> first example with it
    examples, conflicts, dropped, truncated = [], [], 0, 0
    for r in rows:
        inp = r["input"].strip()
        if len(inp) > d.max_input_chars:
            inp, truncated = _cut(inp, d.max_input_chars), truncated + 1
        prompt = r["instruction"].strip() + (f"\n\n{inp}" if inp else "")
        # Whitespace-insensitive key: dedupe, conflicts, split and id all agree on what "the same prompt" is.
        ex = {"prompt": prompt, "completion": r["output"].strip(), "at": f"{r['file']}:{r['line']}",
              "key": " ".join(prompt.split())}
        prev = first.setdefault(ex["key"], ex)
        if prev is not ex:
            if prev["completion"] != ex["completion"]:
                conflicts.append(f"{prev['at']} and {ex['at']}: the same prompt has two different "
                                 f"outputs ({prev['completion']!r} vs {ex['completion']!r})")
                continue
            if d.dedupe:
                dropped += 1
                continue
        examples.append(ex)
    if conflicts:
        why = (f" (inputs are cut to data.max_input_chars={d.max_input_chars}, which can make two long inputs equal)"
               if truncated else "")
        raise DataError(f"{raw}: {len(conflicts)} conflicting duplicate(s){why}; fix or remove one line of each pair:"
                        + _listed(conflicts))

    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    seen_ids: Counter = Counter()
    for ex in examples:
        # data.split.seed, not the training seed: another training seed never moves rows between splits.
        b = _bucket(d.split.seed, ex["key"])  # duplicates kept by dedupe=false share a split: no train/test leak
        name = "test" if b < d.split.test else "val" if b < d.split.test + d.split.val else "train"
        ex_id = _sha(ex["key"])[:16]
        seen_ids[ex_id] += 1
        if seen_ids[ex_id] > 1:  # only with dedupe=false; ids stay unique
            ex_id += f"-{seen_ids[ex_id]}"
        splits[name].append({"id": ex_id, "system": d.system_prompt, "prompt": ex["prompt"], "completion": ex["completion"]})
    sizes = {k: len(v) for k, v in splits.items()}
    if min(sizes.values()) == 0 or sizes["train"] < 8:
        raise DataError(f"{raw}: {len(examples)} rows give splits {sizes}; every split needs rows and train "
                        f"needs >= 8: add data or change data.split (val/test fractions) in the params file")

    out = ws_path(workspace, d.prepared)
    for name, split in splits.items():
        split.sort(key=lambda e: e["id"])
        atomic_write_text(out / f"{name}.jsonl", _jsonl(split))
    stats = {"rows_raw": len(rows), "rows_after_dedupe": len(examples), "duplicates_dropped": dropped, **sizes,
             # Inputs cut to data.max_input_chars: never silent, it changes what the model sees.
             "inputs_truncated": truncated, "max_input_chars": d.max_input_chars,
             "labels": dict(sorted(Counter(e["completion"] for e in examples).items()))}
    atomic_write_json(out / "stats.json", stats)
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tasks.data")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample", help="build the stdlib-docstring sample dataset")
    s.add_argument("--out", required=True)
    p = sub.add_parser("prepare", help="validate, dedupe, split and format the raw data")
    p.add_argument("--params", required=True)
    p.add_argument("--workspace", default=".")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "sample":
            print(f"wrote {build_sample(Path(a.out))} rows to {a.out}")
        else:
            print(json.dumps(prepare(load_params(a.params), Path(a.workspace))))
    except (DataError, ParamsError) as e:
        print(f"error: {e}", file=sys.stderr)  # exit 2 = bad data or params, no traceback
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
