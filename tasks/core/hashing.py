"""The one hash every key and digest of qlora-ops is made with (tasks/model/keys.py builds the keys on it)."""
from __future__ import annotations

import hashlib
import json
from typing import Any


def digest(*parts: Any) -> str:
    """sha256 of the parts as canonical JSON, 16 hex digits."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def params_digest(dump: dict, *sections: str) -> str:
    """Digest of the chosen sections of a params dump (all if none): Params.digest."""
    return digest({k: dump[k] for k in sections} if sections else dump)
