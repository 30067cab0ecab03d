"""Text helpers of the data stage and the sample builders: a stable hash, JSONL that never splits, a cut
at a word boundary."""
from __future__ import annotations

import hashlib
import json
import re


def sha256_text(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def jsonl(rows: list[dict]) -> str:
    # ensure_ascii: U+2028, U+0085 etc. come out escaped, so even a reader that splits with
    # str.splitlines() can never cut a row in two.
    return "".join(json.dumps(r) + "\n" for r in rows)


def cut_at_word(s: str, limit: int) -> str:
    """s cut to <= limit chars at a whitespace boundary (hard cut if one word is longer than limit)."""
    if len(s) <= limit:
        return s
    head = s[:limit + 1]  # +1: a cut exactly before a space keeps the last whole word
    m = re.match(r"(.*\S)\s", head, re.S)
    return m.group(1) if m else s[:limit]
