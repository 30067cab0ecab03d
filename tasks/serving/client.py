"""A live endpoint, asked as a client would: its URL checked (http(s) only) and shown without a password,
JSON posted; MLflow's scoring server (/invocations: answers, `describe`) and an OpenAI-compatible server
(/v1/models, /v1/chat/completions). Stdlib only: what tasks/serving/parity.py sends its test rows through.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from qlora_ops.tasks.core.secrets import redact_url
from qlora_ops.tasks.serving.server import ServingError


class EndpointUnavailable(ServingError):
    """The endpoint did not answer (or answered with an error)."""


def http_url(url: str) -> str:
    """`url` if it is http(s)://host...; else ServingError (urllib would also open file:// and the like)."""
    p = urlsplit(url)
    if p.scheme not in ("http", "https") or not p.hostname:
        raise ServingError(f"endpoint URL {redact_url(url)!r}: expected http(s)://host[:port]")
    return url.rstrip("/")


def _post(url: str, body: dict, timeout: float) -> dict:
    url = http_url(url)
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:  # the message is printed and may be recorded: no password, no token in it
        raise EndpointUnavailable(redact_url(f"{url} answered {e.code}: {e.read()[:500].decode(errors='replace')}")) from None
    except (OSError, ValueError) as e:
        raise EndpointUnavailable(redact_url(f"{url} did not answer ({type(e).__name__}: {e})")) from None


# ---------------------------------------------------------------- MLflow's scoring server

def ask(url: str, records: list[dict], batch_size: int, timeout: float = 600) -> list[str]:
    """Answers of a scoring-server endpoint to `records` ({"prompt"[, "system"]}), one request per batch
    of the evaluation's batch size (the served model decodes each request in those same batches)."""
    out: list[str] = []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        res = _post(f"{url.rstrip('/')}/invocations", {"dataframe_records": chunk}, timeout).get("predictions")
        if not isinstance(res, list) or len(res) != len(chunk):
            raise EndpointUnavailable(f"{redact_url(url)}/invocations returned {str(res)[:200]!r} for {len(chunk)} rows")
        out += [str(a) for a in res]
    return out


def describe(url: str, timeout: float = 60) -> dict | None:
    """What a qlora-ops endpoint says decides its answers; None for an endpoint that does not say."""
    try:
        res = _post(f"{url.rstrip('/')}/invocations", {"dataframe_records": [{"prompt": ""}],
                                                       "params": {"describe": True}}, timeout)
        d = json.loads(res["predictions"][0])
        return d if isinstance(d, dict) and "weights_digest" in d else None
    except (EndpointUnavailable, KeyError, IndexError, TypeError, ValueError):
        return None


# ---------------------------------------------------------------- an OpenAI-compatible server

def is_openai(url: str, timeout: float = 10) -> str | None:
    """The model id an OpenAI-compatible endpoint serves (GET /v1/models), or None."""
    try:
        with urllib.request.urlopen(f"{http_url(url)}/v1/models", timeout=timeout) as r:
            return str(json.loads(r.read())["data"][0]["id"])
    except (OSError, ValueError, KeyError, IndexError, TypeError, ServingError):
        return None


def ask_openai(url: str, rows: list[dict], system: str | None, max_new_tokens: int, timeout: float = 600) -> list[str]:
    """Answers of /v1/chat/completions, greedy (temperature 0, top_k 1, no repeat penalty: llama.cpp's server
    applies 1.1 unless told), the system turn always sent as tasks.model.prompting renders it."""
    out = []
    for r in rows:
        msgs = [{"role": "system", "content": r.get("system") or system or ""}, {"role": "user", "content": r["prompt"]}]
        body = {"messages": msgs, "temperature": 0.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0,
                "max_tokens": int(max_new_tokens), "seed": 0}
        res = _post(f"{url.rstrip('/')}/v1/chat/completions", body, timeout)
        try:
            out.append(str(res["choices"][0]["message"]["content"] or "").strip())
        except (KeyError, IndexError, TypeError):
            raise EndpointUnavailable(f"{redact_url(url)}/v1/chat/completions returned {str(res)[:200]!r}") from None
    return out
