"""What changed between two data versions: two prepared dirs (train/val/test.jsonl), row by row.

    d = diff_rows(old_dir, new_dir, threshold=0.7)   # small JSON-able dict (the run's data card holds it)
    print("\n".join(format_diff(d)))

How a new row is matched with an old one (over all splits together, and again within each split):
  - the same prompt: equal prompt text up to whitespace (prepare's exact key, tasks/data/prepare.py);
    with the same completion it is `unchanged`, with another completion `answer_changed` (a label fix);
  - else a `text_edited` row (a cosmetic edit): an unmatched new row in the same near-duplicate cluster
    (tasks/data/dedupe.py: equal normalised prompt, or word-shingle Jaccard >= threshold) as an unmatched
    old row, paired one to one within the cluster; its completion may differ too;
  - the rest are `added` (new side) and `removed` (old side).
Per split, a row that moved between splits is removed from one and added to the other.

Also: the label distribution shift when the data has labels (chi-square test of old vs new counts, and
PSI over the label bins), the prompt length shift (chars; KS two-sample test), and how many new rows have
a near-duplicate in the new data. Pure functions: no MLflow, no DVC.
"""
from __future__ import annotations

import gzip
import json
import math
import shutil
from collections import Counter, defaultdict
from pathlib import Path
from statistics import mean, median

from scipy.stats import chi2_contingency, ks_2samp

from qlora_ops.tasks.data.dedupe import clusters, normalise

SPLITS = ("train", "val", "test")
PSI_EPS = 1e-4  # a label absent on one side would make PSI infinite: its share is taken as this instead
PSI_SHIFT = 0.1  # the usual reading: < 0.1 no shift, 0.1-0.25 moderate, > 0.25 large
MAX_LABELS = 20  # as the report's label-task rule (tasks/report/gather.py): more distinct answers is free text
KEEP = 3  # prepared copies kept per DVC stage in the state dir (remember)


def _rows(d: Path, split: str) -> list[dict]:
    """One split's rows: a prepared dir's `<split>.jsonl`, or a remembered copy's `<split>.jsonl.gz`."""
    for f, op in ((Path(d) / f"{split}.jsonl", open), (Path(d) / f"{split}.jsonl.gz", gzip.open)):
        if f.is_file():
            with op(f, "rt", encoding="utf-8") as fh:
                return [json.loads(line) for line in fh if line.strip()]
    return []


def _key(r: dict) -> str:
    return " ".join(str(r.get("prompt", "")).split())


def _match(old: list[dict], new: list[dict], threshold: float) -> dict:
    """Counts of unchanged / answer_changed / text_edited / added / removed between two row lists."""
    olds: dict[str, list[dict]] = defaultdict(list)
    for r in old:
        olds[_key(r)].append(r)
    c = Counter()
    new_only = []
    for r in new:
        same = olds.get(_key(r))
        if same:  # the same prompt: pair with one old row (dedupe=false keeps copies: one each)
            o = same.pop()
            c["unchanged" if o.get("completion") == r.get("completion") else "answer_changed"] += 1
        else:
            new_only.append(r)
    old_only = [r for rs in olds.values() for r in rs]
    # Only the unmatched rows are clustered: the cost stays with what changed, not with the data size.
    if old_only and new_only:
        texts = [normalise(str(r.get("prompt", ""))) for r in old_only + new_only]
        cid = clusters(texts, threshold)
        n_old: Counter = Counter(cid[:len(old_only)])
        n_new: Counter = Counter(cid[len(old_only):])
        c["text_edited"] = sum(min(n, n_old[k]) for k, n in n_new.items())
    c["added"] = len(new_only) - c["text_edited"]
    c["removed"] = len(old_only) - c["text_edited"]
    return {k: c[k] for k in ("added", "removed", "answer_changed", "text_edited", "unchanged")}


def _labels(old: list[dict], new: list[dict], labels: list[str] | None) -> dict | None:
    """Old vs new label counts over the bins = every label seen on either side (plus data.labels)."""
    a = Counter(str(r.get("completion")) for r in old)
    b = Counter(str(r.get("completion")) for r in new)
    bins = sorted(set(a) | set(b) | set(labels or []))
    # Free text (many, long or unrepeated answers) has no label distribution to compare.
    if not labels and (len(bins) > MAX_LABELS or any(len(x) > 40 for x in bins) or len(bins) * 2 > len(old) + len(new)):
        return None
    if len(bins) < 2 or not old or not new:
        return None
    seen = [x for x in bins if a[x] + b[x] > 0]  # a bin empty on both sides has no expected count
    chi2 = p = None
    if len(seen) >= 2:
        chi2, p, _, _ = chi2_contingency([[a[x] for x in seen], [b[x] for x in seen]])
    na, nb = sum(a.values()), sum(b.values())
    psi = 0.0
    for x in bins:
        pa, pb = max(a[x] / na, PSI_EPS), max(b[x] / nb, PSI_EPS)
        psi += (pb - pa) * math.log(pb / pa)
    return {"bins": bins, "old": {x: a[x] for x in bins}, "new": {x: b[x] for x in bins},
            "chi2": round(float(chi2), 4) if chi2 is not None else None,
            "p_value": float(p) if p is not None else None, "psi": round(psi, 4), "shift": psi > PSI_SHIFT}


def _lengths(old: list[dict], new: list[dict]) -> dict | None:
    la = [len(str(r.get("prompt", ""))) for r in old]
    lb = [len(str(r.get("prompt", ""))) for r in new]
    if not la or not lb:
        return None
    ks = ks_2samp(la, lb)
    return {"old_mean": round(mean(la), 1), "new_mean": round(mean(lb), 1), "old_median": median(la),
            "new_median": median(lb), "ks": round(float(ks.statistic), 4), "ks_p": float(ks.pvalue)}


def diff_rows(old_dir: Path, new_dir: Path, threshold: float, labels: list[str] | None = None) -> dict:
    """Compare two prepared dirs (see the module doc for what each count means). `threshold`: the
    near-duplicate Jaccard threshold (data.split.near_dup_threshold); `labels`: data.labels, if set."""
    old = {s: _rows(old_dir, s) for s in SPLITS}
    new = {s: _rows(new_dir, s) for s in SPLITS}
    all_old = [r for s in SPLITS for r in old[s]]
    all_new = [r for s in SPLITS for r in new[s]]
    texts = [normalise(str(r.get("prompt", ""))) for r in all_new]
    cid = clusters(texts, threshold) if texts else []
    size = Counter(cid)
    return {"threshold": threshold, "rows": {"old": len(all_old), "new": len(all_new)},
            "all": _match(all_old, all_new, threshold),
            "splits": {s: _match(old[s], new[s], threshold) for s in SPLITS},
            "labels": _labels(all_old, all_new, labels), "length": _lengths(all_old, all_new),
            # rows of the new data with at least one near-duplicate (or equal normalised prompt) in it
            "near_duplicate_rows": sum(1 for c in cid if size[c] > 1)}


def format_diff(d: dict) -> list[str]:
    """Lines for humans: the counts, per split, the label shift, the length shift."""
    a = d["all"]
    L = [f"rows {d['rows']['old']} -> {d['rows']['new']}: +{a['added']} added, -{a['removed']} removed, "
         f"{a['answer_changed']} answers changed, {a['text_edited']} text edits (near-duplicate), {a['unchanged']} unchanged"]
    L.append("  per split (added/removed/answers/text edits): " + ", ".join(
        f"{s} +{v['added']}/-{v['removed']}/{v['answer_changed']}/{v['text_edited']}" for s, v in d["splits"].items()))
    if (lb := d.get("labels")):
        p = f"chi-square p={lb['p_value']:.3g}" if lb.get("p_value") is not None else "chi-square: one label seen"
        L.append(f"  labels ({len(lb['bins'])} bins, one per label): {p}, PSI {lb['psi']:.3f}"
                 f"{' (shifted)' if lb['shift'] else ''}; "
                 + ", ".join(f"{x} {lb['old'][x]}->{lb['new'][x]}" for x in lb["bins"][:8])
                 + (" ..." if len(lb["bins"]) > 8 else ""))
    if (ln := d.get("length")):
        L.append(f"  prompt chars: mean {ln['old_mean']} -> {ln['new_mean']}, median {ln['old_median']} -> "
                 f"{ln['new_median']}, KS {ln['ks']:.3f} (p={ln['ks_p']:.3g})")
    L.append(f"  near-duplicate rows in the new data: {d['near_duplicate_rows']} (threshold {d['threshold']})")
    return L


def card_lines(card: dict) -> list[str]:
    """A data card's diff (flows/retrain.py: {version, previous, ...diff_rows} or {version, first} or
    {version, error}) as lines: the run summary shows the first two, the report all, the model card four."""
    if card.get("first"):
        return [f"first data version ({card['version']}): nothing to compare with"]
    if "all" not in card:
        return [f"data diff not computed: {card.get('error', 'unknown reason')}"]
    lines = format_diff(card)
    return [f"data version {card['version']} vs {card['previous']}: {lines[0]}", *lines[1:]]


# ---------------------------------------------------------------- the versions a workspace ran
# DVC overwrites the prepared dir with each version, so the flow keeps a gzipped copy of the last few
# (one folder per DVC stage: two params files are two datasets) to diff the next version against.
def _index(store: Path) -> list[str]:
    f = store / "versions.json"
    return json.loads(f.read_text()) if f.is_file() else []


def previous(store: Path, version: str) -> Path | None:
    """The copy of the newest other version remembered in `store`, or None (the first data version)."""
    for v in reversed(_index(store)):
        if v != version and (store / v).is_dir():
            return store / v
    return None


def remember(store: Path, version: str, prepared: Path, keep: int = KEEP) -> None:
    """Keep a gzipped copy of `prepared`'s splits as `version` (newest last), and only the last `keep`."""
    d = store / version
    if not d.is_dir():
        tmp = store / f".{version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for s in SPLITS:
            if (Path(prepared) / f"{s}.jsonl").is_file():
                with open(Path(prepared) / f"{s}.jsonl", "rb") as src, gzip.open(tmp / f"{s}.jsonl.gz", "wb") as dst:
                    shutil.copyfileobj(src, dst)
        tmp.rename(d)  # whole or not at all: a half copy would diff as removed rows
    order = [v for v in _index(store) if v != version] + [version]
    for v in order[:-keep]:
        shutil.rmtree(store / v, ignore_errors=True)
    (store / "versions.json").write_text(json.dumps(order[-keep:]))
