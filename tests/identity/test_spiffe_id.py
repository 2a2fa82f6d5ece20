"""SPIFFE ID validation (catalogue J27, J28; SPIFFE-ID.md §2)."""

from __future__ import annotations

import pytest

from broker.identity import InvalidToken, parse_spiffe_id

TD = "example.org"


@pytest.mark.parametrize(
    "value",
    [
        "spiffe://example.org/agents/reporter",
        "spiffe://example.org/a",
        "spiffe://example.org/ns/prod/sa/Deploy_Bot-2.v1",
        "spiffe://example.org/..a/b..",
        "spiffe://example.org/" + "a" * (2048 - len("spiffe://example.org/")),
    ],
    ids=["plain", "one-segment", "k8s-style", "dots-inside-segments", "exactly-2048-bytes"],
)
def test_valid_ids_are_returned_unchanged(value: str) -> None:
    assert parse_spiffe_id(value, TD) == value


def test_trust_domain_charset_allows_digits_dots_dashes_underscores() -> None:
    value = "spiffe://prod-1.my_org.example/w"
    assert parse_spiffe_id(value, "prod-1.my_org.example") == value


@pytest.mark.parametrize(
    "value",
    [
        "spiffe://Example.org/x",
        "SPIFFE://example.org/x",
        "Spiffe://example.org/x",
        "spiffe://example.org:8443/x",
        "spiffe://user@example.org/x",
        "spiffe://example.org/x?q=1",
        "spiffe://example.org/x#f",
        "spiffe://example.org/a/../b",
        "spiffe://example.org/a/./b",
        "spiffe://example.org/..",
        "spiffe://example.org/a//b",
        "spiffe://example.org/a/",
        "spiffe://example.org/",
        "spiffe://example.org",
        "spiffe:///x",
        "spiffe://example.org/" + "a" * 2048,
        "https://example.org/x",
        "spiffe:/example.org/x",
        "spiffe//example.org/x",
        "spiffe://example.org/a%2Fb",
        "spiffe://example.org/a b",
        "spiffe://example.org/caf\u00e9",
        "spiffe://exa\u0442ple.org/x",
        "spiffe://example.org/x\n",
        "spiffe://example.org/x\x00",
        " spiffe://example.org/x",
        "spiffe://example.org\\x",
        "spiffe://[::1]/x",
        "",
    ],
    ids=[
        "J27-uppercase-trust-domain",
        "uppercase-scheme",
        "mixed-case-scheme",
        "J27-port",
        "J27-userinfo",
        "J27-query",
        "J27-fragment",
        "J27-dot-dot-segment",
        "dot-segment",
        "dot-dot-only",
        "empty-segment",
        "trailing-slash",
        "root-path",
        "trust-domain-only",
        "empty-trust-domain",
        "J27-over-2048-bytes",
        "J27-https-scheme",
        "single-slash",
        "no-colon",
        "percent-encoded",
        "space",
        "non-ascii-path",
        "cyrillic-lookalike-domain",
        "newline",
        "nul",
        "leading-space",
        "backslash",
        "ip-literal",
        "empty",
    ],
)
def test_invalid_ids_are_refused(value: str) -> None:
    with pytest.raises(InvalidToken) as caught:
        parse_spiffe_id(value, TD)
    assert caught.value.detail == "invalid SPIFFE ID"


@pytest.mark.parametrize(
    "value",
    [
        "spiffe://evil.org/agents/reporter",
        "spiffe://example.org.evil.org/agents/reporter",
        "spiffe://sub.example.org/agents/reporter",
        "spiffe://example.or/agents/reporter",
    ],
    ids=["other-domain", "suffix-lookalike", "subdomain", "prefix"],
)
def test_J28_other_trust_domain_is_refused(value: str) -> None:
    with pytest.raises(InvalidToken) as caught:
        parse_spiffe_id(value, TD)
    assert caught.value.detail == "SPIFFE ID is outside the issuer's trust domain"


def test_non_string_is_refused() -> None:
    with pytest.raises(InvalidToken):
        parse_spiffe_id(123, TD)  # type: ignore[arg-type]
