"""What "the same prompt" means to the split: a normalised key and near-duplicate clusters.

    normalise("What is  X?")  == normalise("what is x")        # Unicode NFKC, case, punctuation, whitespace
    clusters(["a b c d e", "a b c d e f", "x y z"], 0.7)      # -> [0, 0, 1]

Two rows whose normalised keys are equal, or whose word-shingle sets have a Jaccard similarity of at
least `threshold` (datasketch MinHash LSH proposes the pairs, banded for recall; each proposed pair is
then checked on the exact shingle sets, so LSH's false positives never merge), are one cluster; prepare puts a whole
cluster in one split, so a re-cased or re-punctuated copy of a test prompt can never land in train.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter

# Recorded with every test-set lineage (tasks/data/lineage.py): another normaliser moves rows between
# splits, so changing this string is a split-setting change that prepare refuses without a new lineage.
NORMALISER = "nfkc-casefold-nopunct-ws/1"
SHINGLE = 3  # words per shingle
LSH_SLACK = 0.2  # LSH proposes pairs from (threshold - this) up; the exact check then applies threshold
NUM_PERM = 128  # MinHash permutations: the LSH band layout datasketch derives for the threshold
# A shingle found in more than this share of the prompts is template text (the same instruction on
# every row), not content: kept in, it would make every pair of short rows look alike.
TEMPLATE_SHARE = 0.5
_WS = re.compile(r"\s+")


def normalise(text: str) -> str:
    """NFKC, case-folded, every Unicode punctuation character a space, whitespace collapsed."""
    t = unicodedata.normalize("NFKC", text).casefold()
    t = "".join(" " if unicodedata.category(c).startswith("P") else c for c in t)
    return _WS.sub(" ", t).strip()


def _shingles(norm: str) -> set[str]:
    words = norm.split()
    if len(words) < SHINGLE:
        return {norm} if norm else set()
    return {" ".join(words[i:i + SHINGLE]) for i in range(len(words) - SHINGLE + 1)}


class _Union:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def shingle_sets(texts: list[str]) -> list[set[str]]:
    """Each normalised text's word shingles, less the template shingles (in most of the texts)."""
    sets = [_shingles(t) for t in texts]
    df = Counter(s for sh in set(texts) for s in _shingles(sh))
    distinct = len(set(texts))
    if distinct >= 20:  # too few prompts to tell template text from content
        template = {s for s, c in df.items() if c > TEMPLATE_SHARE * distinct}
        sets = [(s - template) or s for s in sets]
    return sets


def clusters(texts: list[str], threshold: float, same: list[str] | None = None) -> list[int]:
    """A cluster id per text (the smallest index in its cluster). `texts` are normalised; `same`, when
    given, are extra keys that put two texts in one cluster when equal (prepare's exact prompt key)."""
    from datasketch import MinHash, MinHashLSH

    n = len(texts)
    uf = _Union(n)
    for keys in (texts, same or []):
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            uf.join(first.setdefault(k, i), i)
    sets = shingle_sets(texts)
    # LSH tuned for recall (a missed pair is a leak; a proposed pair that is not one costs one exact check):
    # banded for a lower threshold, false negatives weighted 9:1 against false positives.
    lsh = MinHashLSH(threshold=max(0.2, threshold - LSH_SLACK), num_perm=NUM_PERM, weights=(0.1, 0.9))
    done: dict[str, int] = {}
    for i, sh in enumerate(sets):
        if not sh or texts[i] in done:  # an equal text is already joined above
            continue
        done[texts[i]] = i
        m = MinHash(num_perm=NUM_PERM)
        m.update_batch([s.encode() for s in sh])
        for j in lsh.query(m):
            if uf.find(i) != uf.find(j) and jaccard(sh, sets[j]) >= threshold:
                uf.join(i, j)
        lsh.insert(i, m)
    return [uf.find(i) for i in range(n)]


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0
