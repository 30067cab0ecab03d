"""Data stage: the sample dataset, validation that fails loudly, dedupe, hash split, prompt format.

    python -m tasks.data sample --out data/raw/stdlib_docstrings.jsonl   # dvc.yaml stage `sample`
    python -m tasks.data prepare --params params/default.yaml            # dvc.yaml stage `prepare`

Raw data is alpaca-style JSONL: {"instruction": str, "input": str (optional), "output": str}.
Every bad line is reported as file:line (all of them, up to a limit) and nothing is written;
no row is ever skipped silently.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import sys
import sysconfig
from collections import Counter
from pathlib import Path

from tasks.config import Params, ParamsError, load_params
from tasks.paths import ws_path
from tasks.util import atomic_write_json, atomic_write_text


class DataError(ValueError):
    """Bad raw data: the message names file:line, what is wrong and how to fix it."""


# ---------------------------------------------------------------- sample: stdlib docstrings
# Pure-Python on every CPython >= 3.11, with many docstrings that carry domain cues.
SAMPLE_MODULES = ["asyncio", "email", "http", "logging", "tarfile", "turtle", "unittest", "xml"]
PER_MODULE = 60
INSTRUCTION = "Which Python stdlib module is this docstring from?"


def _sources(module: str) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    if (root / module).is_dir():  # a package: every .py below it, tests excluded
        return sorted(p for p in (root / module).rglob("*.py") if "test" not in p.relative_to(root).parts[1:-1]
                      and not p.name.startswith("test"))
    return [root / f"{module}.py"]


def _first_sentence(doc: str, limit: int = 160) -> str:
    para = " ".join(doc.strip().split("\n\n")[0].split())
    m = re.match(r"(.+?[.!?])(\s|$)", para)
    s = m.group(1) if m else para
    if len(s) > limit:
        s = s[:limit].rsplit(" ", 1)[0]
    return s


def _docstrings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))  # parse, never import: no side effects
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node)
            if doc:
                out.append((node.name, doc))
    return out


def sample_rows() -> list[dict]:
    rows = []
    for mod in SAMPLE_MODULES:
        seen, cands = set(), []
        for src in _sources(mod):
            for name, doc in _docstrings(src):
                s = _first_sentence(doc)
                # too short to carry a cue, just the name, or leaks the label: not a fair question
                if len(s) < 25 or s.lower().strip(".") == name.lower() or mod in s.lower() or s in seen:
                    continue
                seen.add(s)
                cands.append(s)
        if len(cands) < PER_MODULE:
            raise DataError(f"stdlib module {mod} yields only {len(cands)} usable docstrings (< {PER_MODULE})")
        # a stable choice (hash order), identical for identical stdlib sources
        cands.sort(key=lambda s: hashlib.sha256(s.encode()).hexdigest())
        rows += [{"instruction": INSTRUCTION, "input": s, "output": mod} for s in cands[:PER_MODULE]]
    rows.sort(key=lambda r: hashlib.sha256((r["input"] + r["output"]).encode()).hexdigest())
    return rows


def build_sample(out: Path) -> int:
    rows = sample_rows()
    atomic_write_text(Path(out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)


# ---------------------------------------------------------------- validation
FIX = 'each line must be a JSON object {"instruction": str, "input": str (optional), "output": str}; see README "Your own data"'
MAX_LISTED = 20


def load_raw(path: Path) -> list[dict]:
    """Validated rows, each with its source line number. Raises DataError listing every bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: raw data file not found (set data.raw in your params file to an existing JSONL file)")
    rows, errors = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            errors.append(f"{where}: a JSON {type(obj).__name__}, not an object")
            continue
        bad = []
        for key in ("instruction", "output"):
            if key not in obj:
                bad.append(f'missing "{key}"')
            elif not isinstance(obj[key], str) or not obj[key].strip():
                bad.append(f'"{key}" must be a non-empty string (got {obj[key]!r:.40})')
        if "input" in obj and not isinstance(obj["input"], str):
            bad.append(f'"input" must be a string (got {type(obj["input"]).__name__})')
        if bad:
            errors.append(f"{where}: " + "; ".join(bad))
            continue
        rows.append({"instruction": obj["instruction"], "input": obj.get("input", ""), "output": obj["output"], "line": n})
    if errors:
        more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        raise DataError(f"{path}: {len(errors)} bad line(s) ({FIX}):\n  " + "\n  ".join(errors[:MAX_LISTED]) + more)
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty); {FIX}")
    return rows


# ---------------------------------------------------------------- prepare
def _truncate(s: str, limit: int) -> str:
    s = " ".join(s.split())
    return s if len(s) <= limit else s[:limit].rsplit(" ", 1)[0]


def _bucket(seed: int, prompt: str) -> float:
    return int(hashlib.sha256(f"{seed}:{prompt}".encode()).hexdigest()[:12], 16) / 16 ** 12


def prepare(params: Params, workspace: Path) -> dict:
    """Validate -> dedupe -> hash split -> prompt format; write train/val/test JSONL + stats.json."""
    d = params.data
    raw = ws_path(workspace, d.raw)
    rows = load_raw(raw)
    seen: dict[str, dict] = {}
    examples, dropped = [], 0
    for r in rows:
        inp = _truncate(r["input"], d.max_input_chars) if r["input"].strip() else ""
        ex = {"prompt": r["instruction"].strip() + (f"\n\n{inp}" if inp else ""), "completion": r["output"].strip(),
              "line": r["line"]}
        key = " ".join(ex["prompt"].split())
        first = seen.get(key)
        if first is None:
            seen[key] = ex
        elif first["completion"] != ex["completion"]:
            raise DataError(f"{raw}:{first['line']} and {raw}:{r['line']}: the same prompt has two different "
                            f"outputs ({first['completion']!r} vs {ex['completion']!r}); fix or remove one of them")
        elif d.dedupe:
            dropped += 1
            continue
        examples.append(ex)

    # Split on a hash of the prompt: adding rows later never moves old rows, and duplicates kept
    # with dedupe=false land in the same split (no train/test leakage).
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for ex in examples:
        b = _bucket(params.seed, ex["prompt"])
        name = "test" if b < d.split.test else "val" if b < d.split.test + d.split.val else "train"
        ex_id = hashlib.sha256(f"{ex['prompt']}\0{ex['line']}".encode()).hexdigest()[:16]
        splits[name].append({"id": ex_id, "system": d.system_prompt, "prompt": ex["prompt"], "completion": ex["completion"]})
    sizes = {k: len(v) for k, v in splits.items()}
    if min(sizes.values()) == 0 or sizes["train"] < 8:
        raise DataError(f"{raw}: {len(examples)} rows give splits {sizes}; every split needs rows and train "
                        f"needs >= 8: add data or change data.split in the params file")
    out = ws_path(workspace, d.prepared)
    for name, ex in splits.items():
        ex.sort(key=lambda e: e["id"])
        atomic_write_text(out / f"{name}.jsonl", "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in ex))
    stats = {"rows_raw": len(rows), "rows_after_dedupe": len(examples), "duplicates_dropped": dropped, **sizes,
             "labels": dict(sorted(Counter(e["completion"] for e in examples).items()))}
    atomic_write_json(out / "stats.json", stats)
    return stats


def read_split(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


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
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
