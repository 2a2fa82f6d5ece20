"""Glob patterns for workload subjects, owners and approver ids.

Semantics (one set, used everywhere a policy takes a glob):

- `*`  matches any run of characters, possibly empty, that does NOT contain `/`;
- `**` matches any run of characters, possibly empty, including `/`;
- `?`  matches exactly one character other than `/`;
- every other character matches itself: `[`, `]`, `{`, `.`, `+`, `\\` ... are literals;
- matching is case-sensitive and anchored: the pattern must cover the whole value.

Why `*` stops at `/`: subjects are hierarchical (SPIFFE IDs, URLs, `repo:org/name`), and a
policy that grants `spiffe://example.org/agents/*` means the agents directly under that path,
not everything nested beneath it. Granting a whole subtree has to be spelled `**`, so a wider
grant is always visible in review. Note that a GitHub Actions `sub` such as
`repo:acme/app:ref:refs/heads/main` contains `/` after the repository, so
`repo:acme/app:*` does not match it; write `repo:acme/app:**` (and pin the branch with a
`claims: {ref: ...}` entry) or spell the subject out.

There are deliberately no character classes or braces: a pattern author who writes `[` means
a bracket, and a smaller language is easier to review for over-broad grants.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# `**` first so the tokenizer never reads it as two single stars.
_PIECE = re.compile(r"\*\*|\*|\?|[^*?]+")
_ANY_RUN_WITHIN_SEGMENT = "[^/]*"
_ANY_RUN = ".*"
_ONE_CHAR_WITHIN_SEGMENT = "[^/]"


def glob_to_regex(pattern: str, *, star_crosses_slash: bool = False) -> str:
    """The regex source equivalent to `pattern` (to be used with `fullmatch`)."""
    single_star = _ANY_RUN if star_crosses_slash else _ANY_RUN_WITHIN_SEGMENT
    parts: list[str] = []
    for piece in _PIECE.findall(pattern):
        if piece == "**":
            parts.append(_ANY_RUN)
        elif piece == "*":
            parts.append(single_star)
        elif piece == "?":
            parts.append(_ONE_CHAR_WITHIN_SEGMENT)
        else:
            parts.append(re.escape(piece))
    return "".join(parts)


@dataclass(frozen=True)
class Glob:
    """A compiled glob; build once at policy load, match many times."""

    pattern: str
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)
    # The same pattern with every `*` allowed to cross `/`, only used to explain a miss.
    _lax_regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # DOTALL: a newline in a subject is just another character, not a barrier.
        strict = glob_to_regex(self.pattern)
        lax = glob_to_regex(self.pattern, star_crosses_slash=True)
        object.__setattr__(self, "_regex", re.compile(strict, re.DOTALL))
        object.__setattr__(self, "_lax_regex", re.compile(lax, re.DOTALL))

    def matches(self, value: str) -> bool:
        return self._regex.fullmatch(value) is not None

    def would_match_with_double_star(self, value: str) -> bool:
        """True when only the `*`-stops-at-`/` rule keeps `value` out: worth a hint."""
        return not self.matches(value) and self._lax_regex.fullmatch(value) is not None

    def explain_miss(self, value: str) -> str:
        hint = ""
        if self.would_match_with_double_star(value):
            hint = " (`*` does not match '/', use `**`)"
        return f"{value!r} does not match {self.pattern!r}{hint}"


def first_match(globs: tuple[Glob, ...], value: str) -> Glob | None:
    return next((glob for glob in globs if glob.matches(value)), None)
