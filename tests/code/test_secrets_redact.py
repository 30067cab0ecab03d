"""The one URL redaction routine (tasks/core/secrets.py redact_url), by property: whatever the URL's shape
(scheme, user, password, token as user name, IPv4/IPv6/name host, port, path, query, fragment, inside
a longer message), the secret never comes out, a second pass changes nothing, and a URL without a
secret comes back as it went in. Plus the places that print or record URLs (serving client, parity)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlora_ops.tasks.core.secrets import redact_url

LOWER = "abcdefghijklmnopqrstuvwxyz"
# Secrets are uppercase+digits (hosts, paths and names below are lowercase): a secret in the output is a leak,
# never a coincidence. Percent-escapes and URL-safe punctuation included, as real tokens have them.
secret = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~%+!$'()*,=", min_size=6, max_size=40).map(lambda s: "S3C" + s)
name = st.text(LOWER + "0123456789-", min_size=1, max_size=12).filter(lambda s: s[0] != "-")
host = st.one_of(
    st.lists(name, min_size=1, max_size=3).map(".".join),
    st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t))),
    st.sampled_from(["[::1]", "[2001:db8::7]", "[fe80::1%25eth0]", "[::ffff:10.0.0.1]"]),
)
port = st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}"))
path = st.lists(name, max_size=3).map(lambda p: "/" + "/".join(p) if p else "")
scheme = st.sampled_from(["http", "https", "s3", "ftp", "postgresql", "mlflow-artifacts"])
SECRET_PARAMS = ["token", "access_token", "api_key", "apikey", "api-key", "key", "password", "passwd", "secret",
                 "X-Amz-Signature", "X-Amz-Credential", "sig", "client_secret", "auth", "session_token"]
PLAIN_PARAMS = ["region", "page", "format", "version", "limit", "name", "x", "lang", "run_id", "experiment"]


@st.composite
def secret_url(draw) -> tuple[str, str]:
    """(a URL holding `s` in one of the places a secret goes, s)."""
    s = draw(secret)
    base = f"{draw(scheme)}://"
    where = draw(st.sampled_from(["password", "user_token", "query", "fragment"]))
    user = draw(name)
    if where == "password":
        auth = f"{user}:{s}@"
    elif where == "user_token":
        auth = f"{s}@"
    else:
        auth = draw(st.sampled_from(["", f"{user}@"])) if where != "query" else ""
    url = base + auth + draw(host) + draw(port) + draw(path)
    params = [f"{p}={draw(name)}" for p in draw(st.lists(st.sampled_from(PLAIN_PARAMS), max_size=2))]
    if where in ("query", "fragment"):
        params.insert(draw(st.integers(0, len(params))), f"{draw(st.sampled_from(SECRET_PARAMS))}={s}")
    if params:
        url += ("#" if where == "fragment" else "?") + "&".join(params)
    return url, s


@st.composite
def plain_url(draw) -> str:
    url = f"{draw(scheme)}://" + draw(host) + draw(port) + draw(path)
    params = [f"{p}={draw(name)}" for p in draw(st.lists(st.sampled_from(PLAIN_PARAMS), max_size=3))]
    return url + ("?" + "&".join(params) if params else "")


@settings(max_examples=400)
@given(case=secret_url(), before=st.sampled_from(["", "error: ", "remote "]), after=st.sampled_from(["", " is down", "\n"]))
def test_the_secret_never_comes_out(case, before, after):
    url, s = case
    out = redact_url(before + url + after)
    assert s not in out, (url, out)
    assert redact_url(out) == out


@settings(max_examples=300)
@given(url=plain_url())
def test_a_url_without_a_secret_is_unchanged_ipv6_included(url):
    assert redact_url(url) == url


@settings(max_examples=300)
@given(text=st.text(max_size=200))
def test_redaction_is_idempotent_on_any_text(text):
    once = redact_url(text)
    assert redact_url(once) == once


@pytest.mark.parametrize("url,want", [
    ("https://ghp_TOKEN123@github.com/o/r", "https://***@github.com/o/r"),  # token as the user name
    ("http://u:pw@[::1]:5000/x?api_key=K1&x=1", "http://u:***@[::1]:5000/x?api_key=***&x=1"),
    ("http://[2001:db8::7]:8080/invocations", "http://[2001:db8::7]:8080/invocations"),  # IPv6 kept whole
    ("ssh://git@host/repo", "ssh://git@host/repo"),  # an ssh account name is not a secret
    ("http://u:p@ss@h/x", "http://u:***@h/x"),  # '@' inside the password: up to the last one, as urllib splits
])
def test_known_shapes(url, want):
    assert redact_url(url) == want


def test_serving_client_errors_and_parity_records_carry_no_secret():
    """`_post`'s errors are printed by verify-serving: before, they held user:password@ in full; the URL
    parity records (the serving_checked tag, readable with READ) went through a copy that kept a token
    given as user name or ?api_key= and dropped IPv6 brackets."""
    from qlora_ops.tasks.serving import client, parity
    from tests.conftest import free_port

    port = free_port()  # nothing listens there
    for url in (f"http://alice:S3CRETPW@127.0.0.1:{port}/x", f"http://S3CRETTOK@127.0.0.1:{port}/x?api_key=S3CRETKEY"):
        with pytest.raises(client.EndpointUnavailable) as e:
            client._post(url, {}, timeout=2)
        assert "S3CRET" not in str(e.value), str(e.value)
    assert not hasattr(client, "redact")  # one routine: tasks.core.secrets.redact_url
    assert parity.redact_url is redact_url
