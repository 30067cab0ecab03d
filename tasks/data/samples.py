"""The built-in sample tasks: real text that ships with Python, turned into training data.

    python -m qlora_ops.tasks.data sample --out data/raw/stdlib_docstrings.jsonl                       # dvc.yaml `sample`
    python -m qlora_ops.tasks.data sample --task free-text --out data/raw/stdlib_summaries.jsonl       # `sample-free-text`

- `docstrings` (the default task, params/default.yaml): the first sentence of a stdlib docstring ->
  which of 8 stdlib modules it comes from. Short labels, scored by exact match.
- `free-text` (params/free-text.yaml): a stdlib function's signature and the rest of its docstring ->
  the docstring's one-line summary (its first sentence). Free text, scored by ROUGE-L: the answer is
  a sentence that can be partly right, so exact match would see almost nothing.

Both parse the stdlib sources with `ast` (never import them: no side effects) and choose rows in hash
order, so a build is byte-identical on the same Python. Kept apart from tasks/data/prepare.py, which validates
and prepares any data: these builders only make two particular data sets.
"""
from __future__ import annotations

import ast
import re
import sysconfig
import warnings
from collections import Counter
from pathlib import Path

from qlora_ops.tasks.data.readers import DataError
from qlora_ops.tasks.data.text import cut_at_word as _cut, jsonl as _jsonl, sha256_text as _sha
from qlora_ops.tasks.core.util import atomic_write_text

# ---------------------------------------------------------------- the default sample: stdlib docstrings
# Pure-Python packages/modules of every CPython >= 3.11, each with >= 100 usable docstrings carrying
# domain cues, and none that distros split into an optional package (turtle/tkinter, venv, distutils).
SAMPLE_MODULES = ["asyncio", "email", "http", "importlib", "logging", "tarfile", "unittest", "xml"]
PER_MODULE = 60  # the same cap for every module: balanced classes
SENTENCE_CHARS = 160
INSTRUCTION = "Which Python stdlib module is this docstring from?"  # the same for every row; README uses it


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _sources(module: str) -> list[Path]:
    root = _stdlib()
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


def _parse(path: Path) -> ast.Module:
    with warnings.catch_warnings():  # a newer stdlib may trip a SyntaxWarning; parsing still works
        warnings.simplefilter("ignore")
        return ast.parse(path.read_bytes(), filename=str(path))  # parse, never import: no side effects


def _docstrings(path: Path) -> list[tuple[str, str]]:
    return [(node.name, doc) for node in ast.walk(_parse(path))
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
                            f"change SAMPLE_MODULES in tasks/data/samples.py")
        rows += [{"instruction": INSTRUCTION, "input": s, "output": mod} for s in cands[:PER_MODULE]]
    rows.sort(key=lambda r: _sha(r["input"] + "\0" + r["output"]))  # interleave labels, deterministically
    return rows


# ---------------------------------------------------------------- the free-text sample: one-line summaries
SUMMARY_INSTRUCTION = "Write the one-line summary that opens this Python function's docstring."
# Directories left out: tests, IDE/demo code, and what distros split into optional packages (the
# sample must be the same on every full CPython of one version). site-packages sits below the stdlib root.
SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "turtledemo", "tkinter", "lib2to3", "distutils", "ensurepip",
             "venv", "pydoc_data", "site-packages", "dist-packages", "__phello__"}
SUMMARY_CHARS = (20, 100)    # a summary line, not a paragraph: short answers keep generation cheap
MIN_BODY_CHARS = 40          # the rest of the docstring must say something to summarise
SUMMARY_INPUT_CHARS = 200    # = params/free-text.yaml data.max_input_chars: cut here, so prepare never cuts
SUMMARY_ROWS = 1200          # enough for a ~240-row test split; more only makes the run longer


SKIP_FILES = {"turtle.py"}  # needs tkinter (split out by distros); its docstrings open with "Aliases:", not a summary


def _summary_files() -> list[Path]:
    root = _stdlib()
    return sorted(p for p in root.rglob("*.py")
                  if not SKIP_DIRS & set(p.relative_to(root).parts[:-1]) and not p.name.startswith("test")
                  and p.name not in SKIP_FILES)


def _split_doc(doc: str) -> tuple[str, str] | None:
    """(first sentence, the rest of the docstring on one line), or None when there is no clean sentence."""
    paras = doc.strip().split("\n\n")
    first = " ".join(paras[0].split())
    m = re.match(r"(.+?[.!?])(\s|$)", first)
    if not m:
        return None
    rest = " ".join((first[m.end(1):] + " " + " ".join(paras[1:])).split())
    return m.group(1), rest


def summary_rows() -> list[dict]:
    """{"instruction", "input": "<module>: <name>(<args>)\\n<rest of the docstring>", "output": summary}."""
    root = _stdlib()
    found: dict[str, set[str]] = {}
    for path in _summary_files():
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        try:
            tree = _parse(path)
        except SyntaxError:  # a file written for another Python (lib2to3 fixtures and the like)
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            parts = _split_doc(doc) if doc else None
            if parts is None:
                continue
            summary, rest = parts
            # A signature echo ("get_data(pathname) -> string") or a doctest is not a summary to learn.
            if (not SUMMARY_CHARS[0] <= len(summary) <= SUMMARY_CHARS[1] or "(" in summary or ">>>" in summary
                    or len(rest) < MIN_BODY_CHARS):
                continue
            head = f"{module}: {node.name}({ast.unparse(node.args)})"
            inp = _cut(f"{head}\n{rest}", SUMMARY_INPUT_CHARS)
            if summary in inp:  # the body repeats its own summary: the answer would be in the question
                continue
            found.setdefault(inp, set()).add(summary)
    # One input, two summaries (the same method documented twice) has no single right answer: dropped.
    pairs = sorted(((i, next(iter(s))) for i, s in found.items() if len(s) == 1), key=lambda p: _sha(p[0] + "\0" + p[1]))
    if len(pairs) < SUMMARY_ROWS:
        raise DataError(f"{root}: the stdlib yields only {len(pairs)} usable docstring summaries (< {SUMMARY_ROWS}); "
                        "build the sample with a full CPython install or point data.raw at your own data")
    return [{"instruction": SUMMARY_INSTRUCTION, "input": i, "output": s} for i, s in pairs[:SUMMARY_ROWS]]


# ---------------------------------------------------------------- building
TASKS = {"docstrings": sample_rows, "free-text": summary_rows}


def build_sample(out: Path, task: str = "docstrings") -> int:
    rows = TASKS[task]()
    atomic_write_text(Path(out), _jsonl(rows))
    return len(rows)
