"""Glob semantics: in `spiffe://` patterns `*` stays within a `/` segment and `**` crosses;
elsewhere `*` matches any run; `?` one char; everything else literal."""

from __future__ import annotations

import pytest

from broker.policy.globs import Glob, first_match

CASES = [
    # (pattern, value, matches, id)
    ("spiffe://example.org/agents/*", "spiffe://example.org/agents/a1", True, "star-one-segment"),
    (
        "spiffe://example.org/agents/*",
        "spiffe://example.org/agents/x/y",
        False,
        "star-not-cross-slash",
    ),
    ("spiffe://example.org/agents/*", "spiffe://example.org/agents/", True, "star-matches-empty"),
    ("spiffe://example.org/agents/*", "spiffe://example.org/agent", False, "prefix-too-short"),
    ("spiffe://example.org/agents/*", "spiffe://example.org/agentsX/a", False, "literal-slash"),
    ("spiffe://example.org/agents/*", "spiffe://evil.org/agents/a", False, "other-trust-domain"),
    ("spiffe://example.org/agents/*", "xspiffe://example.org/agents/a", False, "anchored-start"),
    (
        "spiffe://example.org/agents/**",
        "spiffe://example.org/agents/x/y",
        True,
        "double-star-crosses",
    ),
    ("spiffe://example.org/agents/**", "spiffe://example.org/agents/", True, "double-star-empty"),
    ("spiffe://example.org/**/db", "spiffe://example.org/a/b/db", True, "double-star-middle"),
    (
        "spiffe://example.org/**/db",
        "spiffe://example.org/a/b/dbx",
        False,
        "double-star-anchored-end",
    ),
    ("repo:acme/app:*", "repo:acme/app:pull_request", True, "github-no-slash"),
    (
        "repo:acme/app:*",
        "repo:acme/app:ref:refs/heads/main",
        True,
        "github-star-crosses-slash-SPEC-4-example",
    ),
    ("repo:acme/app:**", "repo:acme/app:ref:refs/heads/main", True, "github-double-star"),
    ("repo:org/app*", "repo:org/app-evil", True, "J36-sloppy-pattern-is-wide"),
    ("repo:org/app:*", "repo:org/app-evil:ref", False, "J36-colon-pins-repo"),
    ("*@example.com", "alice@example.com", True, "owner-domain"),
    ("*@example.com", "alice@example.com.evil.io", False, "owner-anchored-end"),
    ("*@example.com", "alice@EXAMPLE.com", False, "case-sensitive"),
    ("*@example.com", "@example.com", True, "owner-empty-local-part"),
    ("*@example.com", "team/a@example.com", True, "owner-star-crosses-slash"),
    ("agent-?", "agent-1", True, "question-one-char"),
    ("agent-?", "agent-12", False, "question-not-two"),
    ("agent-?", "agent-", False, "question-not-zero"),
    ("a?b", "a/b", True, "question-any-char-outside-spiffe"),
    ("spiffe://x.org/a?b", "spiffe://x.org/a/b", False, "spiffe-question-not-slash"),
    ("spiffe://x.org/*", "spiffe://x.org/a/b", False, "spiffe-star-not-cross-slash"),
    ("Spiffe://x.org/*", "Spiffe://x.org/a/b", True, "only-the-exact-spiffe-prefix-segments"),
    ("a.b", "axb", False, "dot-is-literal"),
    ("a.b", "a.b", True, "dot-matches-dot"),
    ("a+b", "aab", False, "plus-is-literal"),
    ("a+b", "a+b", True, "plus-matches-plus"),
    ("[ab]", "a", False, "bracket-is-literal"),
    ("[ab]", "[ab]", True, "bracket-matches-bracket"),
    ("a{b,c}", "ab", False, "brace-is-literal"),
    ("(a|b)", "a", False, "parens-are-literal"),
    ("a\\*", "a\\xyz", True, "backslash-is-literal-star-still-glob"),
    ("^a$", "^a$", True, "anchors-are-literal"),
    ("exact", "exact", True, "no-metachar-exact"),
    ("exact", "exactly", False, "no-metachar-anchored"),
    ("exact", "", False, "empty-value"),
    ("*", "", True, "star-matches-empty-value"),
    ("*", "a/b", True, "star-alone-crosses-slash-outside-spiffe"),
    ("**", "a/b", True, "double-star-alone"),
    ("a*", "a\nb", True, "newline-is-ordinary"),
]


@pytest.mark.parametrize(("pattern", "value", "expected"), [c[:3] for c in CASES], ids=[c[3] for c in CASES])
def test_glob_matching(pattern: str, value: str, expected: bool) -> None:
    assert Glob(pattern).matches(value) is expected


@pytest.mark.parametrize(
    ("pattern", "value", "hinted"),
    [
        ("spiffe://example.org/agents/*", "spiffe://example.org/agents/x/y", True),
        ("spiffe://example.org/agents/*", "spiffe://other.org/agents/x", False),
    ],
    ids=["slash-only-miss-gets-hint", "real-miss-no-hint"],
)
def test_explain_miss_hints_double_star(pattern: str, value: str, hinted: bool) -> None:
    assert ("use `**`" in Glob(pattern).explain_miss(value)) is hinted


def test_first_match_returns_first_matching_glob() -> None:
    globs = (Glob("a*"), Glob("*b"), Glob("b"))
    assert first_match(globs, "b") == Glob("*b")
    assert first_match(globs, "x/y") is None
