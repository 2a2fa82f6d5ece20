"""The HTTP proxy's parts without sockets or a stack: the target's checks, the one URL a
request may go to, the headers sent, the leak check, the policy's `gateway:` keys and the
approval hash of a lease credential that sets none of them."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from broker.credentials import LeaseCredential, hashed_form
from broker.gateway.httpproxy import forwarded_headers, leaks, split_target, upstream_url
from broker.gateway.service import HeldHeader

ID = "brk_0123456789abcdef01234567"
HELD = HeldHeader(
    upstream="https://api.example.com:8443/v2/",
    name="Authorization",
    value="Bearer user.pass-word",
    secrets=("Bearer user.pass-word", "pass-word", "user"),
    expires_at=datetime(2030, 1, 1, tzinfo=UTC),
)


def lease(**extra: object) -> LeaseCredential:
    return LeaseCredential.model_validate({"kind": "lease", "path": "aws/creds/ro", **extra})


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (f"/h/{ID}/", (ID, "", "")),
        (f"/h/{ID}/a/b?x=1&y=%2F", (ID, "a/b", "x=1&y=%2F")),
        (f"/h/{ID}/a/b/", (ID, "a/b/", "")),
        (f"/h/{ID}/a%20b", (ID, "a b", "")),
    ],
)
def test_a_clean_target_splits(target, expected):
    assert split_target(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        f"/h/{ID}", f"/h/{ID}/../x", f"/h/{ID}/a/../../x", f"/h/{ID}/%2e%2e/x", f"/h/{ID}/%2E%2e",
        f"/h/{ID}/..%2fx", f"/h/{ID}//evil", f"/h/{ID}/a//b", f"/h/{ID}/./a", f"/h/{ID}/a\\b",
        f"/h/{ID}/a%5cb", f"/h/{ID}/a%00", f"/h/{ID}/a%0d%0aHost:%20evil", f"/h/{ID}/%ff",
        f"/h/{ID}/a?b c", f"/h/{ID}/a?x#y", "/h/evil/x", "/h/brk_a.b/x", "http://evil/h/x/",
        "/v1/secret", "//evil/h/x",
    ],
)  # fmt: skip
def test_a_target_that_climbs_out_or_is_not_a_handle_path_is_refused(target):
    assert split_target(target) is None


def test_the_url_is_the_policys_with_the_path_under_its_base():
    assert upstream_url(HELD.upstream, "a/b", "q=1") == "https://api.example.com:8443/v2/a/b?q=1"
    assert upstream_url("http://h", "", "") == "http://h/"
    # Whatever the path says, scheme, host, port and base path stay the policy's.
    assert upstream_url("http://h/base", "http://evil/x", "").startswith("http://h/base/http:")
    assert upstream_url("http://h/base", "@evil/x", "") == "http://h/base/@evil/x"
    assert upstream_url("http://h/base", "a b#c?d", "") == "http://h/base/a%20b%23c%3Fd"


def test_the_real_header_replaces_the_clients_and_the_rest_is_dropped():
    sent = forwarded_headers(
        {
            "authorization": "Bearer clients-own", "x-broker-handle": "secret", "host": "evil",
            "proxy-authorization": "x", "connection": "keep-alive, x-secret-hop", "x-secret-hop": "1",
            "keep-alive": "5", "transfer-encoding": "chunked", "accept-encoding": "gzip",
            "content-type": "application/json", "x-custom": "kept",
        },
        HELD,
    )  # fmt: skip
    assert sent == {
        "content-type": "application/json",
        "x-custom": "kept",
        "Authorization": "Bearer user.pass-word",
        "Accept-Encoding": "identity",
    }


def test_an_answer_with_any_filled_value_leaks():
    assert leaks(HELD, b'{"echo": "pass-word"}', ())
    assert leaks(HELD, b"", (("X-Echo", "Bearer user.pass-word"),))
    assert not leaks(HELD, b'{"ok": true}', (("X-Upstream", "yes"),))


def test_a_lease_without_the_gateway_keys_hashes_as_before():
    assert hashed_form(lease()) == {"kind": "lease", "path": "aws/creds/ro", "method": "read", "params": {}}
    via = lease(delivery="gateway", gateway={"upstream": "https://h/", "header": "X-Key: {data.key}"})
    assert hashed_form(via)["gateway"] == {"upstream": "https://h/", "header": "X-Key: {data.key}"}


@pytest.mark.parametrize(
    "gateway",
    [
        {"upstream": "ftp://h/", "header": "X-Key: {data.key}"},
        {"upstream": "https:///x", "header": "X-Key: {data.key}"},
        {"upstream": "https://h/?q=1", "header": "X-Key: {data.key}"},
        {"upstream": "https://u:p@h/", "header": "X-Key: {data.key}"},
        {"upstream": "https://h/a/../b", "header": "X-Key: {data.key}"},
        {"upstream": "https://h:99999/", "header": "X-Key: {data.key}"},
        {"upstream": "https://h/", "header": "X-Key {data.key}"},
        {"upstream": "https://h/", "header": "X-Key: fixed"},
        {"upstream": "https://h/", "header": "X-Key: {secret.key}"},
        {"upstream": "https://h/", "header": "X-Key: {data.key} {other}"},
        {"upstream": "https://h/", "header": "Host: {data.key}"},
        {"upstream": "https://h/", "header": "Proxy-Authorization: {data.key}"},
        {"upstream": "https://h/", "header": "X-Broker-Handle: {data.key}"},
        {"upstream": "https://h/", "header": "X Key: {data.key}"},
    ],
)
def test_bad_gateway_keys_are_refused_at_load(gateway):
    with pytest.raises(ValidationError):
        lease(delivery="gateway", gateway=gateway)


def test_the_gateway_keys_need_delivery_gateway_and_it_needs_them():
    with pytest.raises(ValidationError):
        lease(delivery="gateway")
    with pytest.raises(ValidationError):
        lease(gateway={"upstream": "https://h/", "header": "X-Key: {data.key}"})
    with pytest.raises(ValidationError):
        lease(requests=["true"])
