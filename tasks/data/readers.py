"""Readers of raw data files: one event stream per file (JSONL, CSV, Parquet, `datasets` .arrow and
`save_to_disk` directories), and the data units under data.raw. tasks/data/prepare.py validates what they yield;
`tasks.data.sources` and the drop path use the same names (DATA_SUFFIXES, is_data_name)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path


class DataError(ValueError):
    """Bad raw data: the message names file:line, what is wrong and how to fix it."""


FIX = 'each line must be a JSON object {"instruction": str, "input": str (optional), "output": str}; see README "Your own data"'
_BATCH = 2048  # rows per read/write batch: memory stays bounded whatever the file size


# ---------------------------------------------------------------- readers: one event stream per data file
# Each reader yields ("columns", names) once when it knows them, then ("row", n, record), ("bad", n, why)
# or ("file", why) (the whole file is unreadable: nothing more follows). Every reader streams: a file is
# never held whole in a Python list.
DATA_SUFFIXES = (".jsonl", ".csv", ".parquet", ".arrow")  # what a raw directory (a data.source snapshot) may hold
# A `Dataset.save_to_disk` / `DatasetDict.save_to_disk` directory: its *.arrow shards plus these files.
SAVED_FILES = ("state.json", "dataset_info.json", "dataset_dict.json")


def is_data_name(name: str) -> bool:
    return name.lower().endswith(DATA_SUFFIXES) or name.rsplit("/", 1)[-1] in SAVED_FILES


def _is_saved(d: Path) -> bool:
    return (d / "state.json").is_file() or (d / "dataset_dict.json").is_file()


def data_files(directory: Path) -> list[Path]:
    """The data of a raw directory at any depth, sorted by relative name: *.jsonl, *.csv, *.parquet,
    *.arrow files and `save_to_disk` directories (one entry each, their shards not listed apart); paths
    with a part starting with "." or "_" are not data (editor temp files, `_SUCCESS`), as in
    tasks.data.sources.snapshot."""
    directory = Path(directory)
    if _is_saved(directory):
        return [directory]
    found, saved = [], []
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory)
        if any(part.startswith((".", "_")) for part in rel.parts) or any(p.is_relative_to(s) for s in saved):
            continue
        if p.is_dir() and _is_saved(p):
            saved.append(p)
            found.append((rel.as_posix(), p))
        elif p.is_file() and p.name.lower().endswith(DATA_SUFFIXES):
            found.append((rel.as_posix(), p))
    return [p for _, p in sorted(found)]


def _jsonl_events(path: Path, columns: bool):
    if columns:  # the keys of the first rows decide the format (auto); a bad line among them does not
        keys: set[str] = set()
        with open(path, "rb") as f:
            for _, raw in zip(range(1000), f):
                try:
                    obj = json.loads(raw)
                except (ValueError, RecursionError):
                    continue
                if isinstance(obj, dict):
                    keys.update(obj)
        yield ("columns", sorted(keys))
    # Binary iteration splits on b"\n" only: str.splitlines() would also split inside a row at U+2028, \x85 ...
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # tolerate a BOM, as editors write one
            except UnicodeDecodeError as e:
                yield ("bad", n, f"not UTF-8 (byte {e.start + 1}); re-save the file as UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield ("row", n, json.loads(line))
            except json.JSONDecodeError as e:
                yield ("bad", n, f"not valid JSON ({e.msg} at column {e.colno})")
            except RecursionError:  # nesting deeper than the stack: a bad line like any other, not a crash
                yield ("bad", n, "not valid JSON (nested too deeply to read)")


def _csv_events(path: Path, columns: bool):
    """Every cell read as text (an empty cell is ""); row n = the n-th data row after the header."""
    import pandas as pd  # only when a table is read

    fix = "re-export it as CSV (quote cells that hold commas, quotes or line breaks)"
    n = 0
    try:
        with warnings.catch_warnings():
            # A row longer than the header would silently lose cells (or become the index): an error here.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            reader = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig", index_col=False,
                                 chunksize=_BATCH)
            chunks = iter(reader)
            first = True
            while True:
                try:
                    chunk = next(chunks)
                except StopIteration:
                    break
                if first:
                    yield ("columns", [str(c) for c in chunk.columns])
                    first = False
                for rec in chunk.to_dict("records"):
                    n += 1
                    yield ("row", n, {str(k): v for k, v in rec.items()})
    except UnicodeDecodeError as e:
        yield ("file", f"not UTF-8 (byte {e.start + 1}); re-save the file as UTF-8")
    except pd.errors.EmptyDataError:
        return  # an empty file holds no rows (checked for the whole data set)
    except Exception as e:  # pandas raises many types for a malformed file; all mean the same here
        yield ("file", f"not a readable CSV file ({type(e).__name__}: {str(e).strip()[:300]}); {fix}")


def _arrow_rows(columns: list[str], batches):
    n = 0
    for batch in batches:
        for rec in zip(*(batch[c] for c in columns)):
            n += 1
            yield ("row", n, dict(zip(columns, rec)))


def _parquet_events(path: Path, columns: bool):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)  # streamed by row group: never the whole table in memory
        names = list(pf.schema_arrow.names)
        yield ("columns", names)
        yield from _arrow_rows(names, (b.to_pydict() for b in pf.iter_batches(batch_size=_BATCH)))
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        yield ("file", f"not a readable Parquet file ({type(e).__name__}: {str(e).strip()[:300]}); re-export it as Parquet")


def _dataset_events(path: Path, columns: bool):
    """A `save_to_disk` directory or an .arrow file: memory-mapped by `datasets`, read in batches."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.Dataset.from_file(str(path))
        yield ("columns", list(ds.column_names))
        yield from _arrow_rows(list(ds.column_names), ds.iter(batch_size=_BATCH))
    except Exception as e:  # a damaged or foreign file: FileNotFoundError, ArrowInvalid, ...
        what = "datasets save_to_disk directory" if path.is_dir() else "datasets .arrow file"
        yield ("file", f"not a readable {what} ({type(e).__name__}: {str(e).strip()[:300]}); save it again with "
                       "Dataset.save_to_disk, or export JSONL/CSV/Parquet")


def _units(path: Path) -> list[tuple[str, Path, str]]:
    """(name used in messages, path, kind) for every data unit under data.raw; a DatasetDict directory is
    one unit per split, named <dir>/<split>."""
    if path.is_dir():
        items = data_files(path)
        if not items:
            raise DataError(f"{path}: no *.jsonl, *.csv or *.parquet file (nor *.arrow or a datasets save_to_disk "
                            "directory) in this directory; put your data there (or point data.raw / data.source "
                            f"at it); {FIX}")
    elif path.is_file():
        items = [path]
    else:
        raise DataError(f"{path}: raw data file not found (set data.raw in your params file to an existing JSONL, "
                        f"CSV or Parquet file, a datasets save_to_disk directory, or a directory of them)")
    units = []
    for p in items:
        if p.is_dir() and (p / "dataset_dict.json").is_file():
            try:
                splits = json.loads((p / "dataset_dict.json").read_text())["splits"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DataError(f"{p / 'dataset_dict.json'}: not a readable DatasetDict index ({e}); save the "
                                "dataset again with save_to_disk") from None
            units += [(str(p / s), p / s, "arrow") for s in splits]
        elif p.is_dir() or p.suffix.lower() == ".arrow":
            units.append((str(p), p, "arrow"))
        else:
            units.append((str(p), p, {".csv": "csv", ".parquet": "parquet"}.get(p.suffix.lower(), "jsonl")))
    return units


_READERS = {"jsonl": _jsonl_events, "csv": _csv_events, "parquet": _parquet_events, "arrow": _dataset_events}


def columns_of(path: Path) -> list[tuple[str, list[str]]]:
    """(unit, column names) of every data unit under `path` (JSONL: the keys of its first 1000 rows),
    reading no more than the first batch of each: what `qlora-ops init` detects the format from."""
    out = []
    for name, p, kind in _units(Path(path)):
        events = _READERS[kind](p, True)
        for ev in events:
            if ev[0] == "columns":
                out.append((name, ev[1]))
                break
            if ev[0] == "file":
                raise DataError(f"{name}: {ev[1]}")
        events.close()
    return out
