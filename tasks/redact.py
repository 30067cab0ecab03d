"""Text safe to log: every URL or message that may reach a log, a run tag, a state or the console goes
through `redact_url` first. Stdlib only (importable from anywhere: tasks, flows, serving)."""
from __future__ import annotations

import re

_USERINFO = re.compile(r"(?P<pre>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):[^@/\s]*@")
_SECRET_QUERY = re.compile(
    r"(?P<pre>[?&;](?:[^=&;#\s]*(?:secret|token|passw|pwd|signature|credential|sig|apikey|api_key|"
    r"access_key|auth)[^=&;#\s]*)=)[^&;#\s]*", re.I)


def redact_url(url: str) -> str:
    """`url` (or any text holding URLs) safe to log: user:password@ -> user:***@, and the values of query
    parameters named like secrets (token, password, secret, signature, credential, ...) -> ***."""
    if not url:
        return url
    return _SECRET_QUERY.sub(r"\g<pre>***", _USERINFO.sub(r"\g<pre>:***@", str(url)))


__all__ = ["redact_url"]
