"""Text safe to log: every URL or message that may reach a log, a run tag, a state or the console goes
through `redact_url` first. Stdlib only (importable from anywhere: tasks, flows, serving)."""
from __future__ import annotations

import re

_USERINFO = re.compile(r"(?P<pre>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):[^@/\s]*@")
_SECRET_QUERY = re.compile(
    r"(?P<pre>[?&;](?:[^=&;#\s]*(?:secret|token|passw|pwd|signature|credential|sig|apikey|api_key|"
    r"access_key|auth)[^=&;#\s]*)=)[^&;#\s]*", re.I)


# Option names that hold a secret (DVC/fsspec: password, secret_access_key, session_token, sas_token,
# account_key, connection_string, ...); a *path* to a credentials file (credentialpath, keyfile) and the
# ask_password flag are not.
SECRET_OPTION = re.compile(r"^(?!ask_)(?!.*(path|file)$).*(pass|secret|token|credential|key_id|access_key|private_key|sas"
                           r"|connection_string|account_key)", re.I)


def holds_secret(url: str) -> bool:
    """True when `url` carries a password (user:password@) or a query parameter named like a secret."""
    return bool(_USERINFO.search(url) or _SECRET_QUERY.search(url))


def redact_url(url: str) -> str:
    """`url` (or any text holding URLs) safe to log: user:password@ -> user:***@, and the values of query
    parameters named like secrets (token, password, secret, signature, credential, ...) -> ***."""
    if not url:
        return url
    return _SECRET_QUERY.sub(r"\g<pre>***", _USERINFO.sub(r"\g<pre>:***@", str(url)))


__all__ = ["SECRET_OPTION", "holds_secret", "redact_url"]
