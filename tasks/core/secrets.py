"""Text safe to log: every URL or message that may reach a log, a run tag, a state or the console goes
through `redact_url` first. Stdlib only (importable from anywhere: tasks, flows, serving)."""
from __future__ import annotations

import re

_SCHEME = r"[A-Za-z][A-Za-z0-9+.-]*://"
# user:password@ (the password runs to the authority's last '@', as urllib splits it)
_USERINFO = re.compile(rf"(?P<pre>{_SCHEME}[^:/@\s?#\[\]]*):[^/\s?#]*@")
# a user name alone is a token on http(s) and most schemes (https://<token>@host, git's and the hubs' way);
# on ssh-like schemes it is an account name and is kept (ssh://git@host)
_USER_ONLY = re.compile(r"(?P<pre>(?<![A-Za-z0-9+.-])(?!(?:ssh|sftp|scp|git\+ssh|ssh\+git)://)"
                        rf"{_SCHEME})[^:/@\s?#\[\]]+@", re.I)
_SECRET_QUERY = re.compile(
    r"(?P<pre>[?&;#](?:[^=&;#\s]*(?:secret|token|passw|pwd|signature|credential|sig|apikey|api_key|api-key|key|"
    r"access_key|auth|session)[^=&;#\s]*)=)[^&;#\s]*", re.I)


# Option names that hold a secret (DVC/fsspec: password, secret_access_key, session_token, sas_token,
# account_key, connection_string, ...); a *path* to a credentials file (credentialpath, keyfile) and the
# ask_password flag are not.
SECRET_OPTION = re.compile(r"^(?!ask_)(?!.*(path|file)$).*(pass|secret|token|credential|key_id|access_key|private_key|sas"
                           r"|connection_string|account_key)", re.I)


def holds_secret(url: str) -> bool:
    """True when `url` carries a password (user:password@) or a query parameter named like a secret."""
    return bool(_USERINFO.search(url) or _SECRET_QUERY.search(url))


def redact_url(url: str) -> str:
    """`url` (or any text holding URLs) safe to log, tag or print: user:password@ -> user:***@, a user name
    used as a token (https://<token>@host) -> ***@, and the values of query or fragment parameters named
    like secrets (token, api_key, key, password, secret, signature, credential, ...) -> ***. The host is
    kept as written (IPv6 brackets included); a URL with none of these comes back unchanged. Idempotent.
    The one redaction routine of the project: everything else calls this one."""
    if not url:
        return url
    text = _USERINFO.sub(r"\g<pre>:***@", str(url))
    text = _USER_ONLY.sub(r"\g<pre>***@", text)
    return _SECRET_QUERY.sub(r"\g<pre>***", text)


__all__ = ["SECRET_OPTION", "holds_secret", "redact_url"]
