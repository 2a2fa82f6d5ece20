"""Glob patterns for workload subjects, owners and approver ids.

Semantics (one set, used everywhere a policy takes a glob):

- in a pattern that starts with `spiffe://` (a SPIFFE ID, a path): `*` matches any run of
  characters, possibly empty, that does NOT contain `/`, `?` one character other than `/`,
  and `**` any run including `/`;
- in every other pattern (OIDC and CI subjects, owners, approver ids): `*` and `**` match
  any run of characters, possibly empty, and `?` exactly one character, as in AWS's
  `StringLike`, which is how CI providers teach their subjects to be matched;
- every other character matches itself: `[`, `]`, `{`, `.`, `+`, `\\` ... are literals;
- matching is case-sensitive and anchored: the pattern must cover the whole value;
- except for owner globs (`Glob(pattern, person=True)`): the value and the pattern's
  literal text are both taken in the normal form of people's names
  (broker/identity/people.py: invisible characters dropped, NFKC, case folded), so
  `*@Example.com` matches `alice@example.com` and no respelling slips past or around one;
  a value with control or invisible characters or mixed look-alike scripts matches none.

Why `*` stops at `/` in SPIFFE IDs: they are paths, and a policy that grants
`spiffe://example.org/agents/*` means the agents directly under that path, not everything
nested beneath it; a whole subtree is spelled `**`, so a wider grant is visible in review.
Other subjects are not paths: a GitHub Actions `sub` such as
`repo:acme/app:ref:refs/heads/main` holds `/` inside its values, and `repo:acme/app:*` (the
contract's own example, pinned to a branch by `claims: {ref: ...}`) must match it.

There are deliberately no character classes or braces: a pattern author who writes `[` means
a bracket, and a smaller language is easier to review for over-broad grants.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from broker.identity.people import InvalidPerson, check_person, fold_person, normalise_person

# `**` first so the tokenizer never reads it as two single stars.
_PIECE = re.compile(r"\*\*|\*|\?|[^*?]+")
_ANY_RUN_WITHIN_SEGMENT = "[^/]*"
_ANY_RUN = ".*"
_ONE_CHAR_WITHIN_SEGMENT = "[^/]"
_ONE_CHAR = "."
SEGMENTED_PREFIX = "spiffe://"


def segmented(pattern: str) -> bool:
    """Whether `*` and `?` stay within one `/`-separated segment in this pattern."""
    return pattern.startswith(SEGMENTED_PREFIX)


def glob_to_regex(
    pattern: str,
    *,
    star_crosses_slash: bool | None = None,
    fold: Callable[[str], str] | None = None,
) -> str:
    """The regex source equivalent to `pattern` (to be used with `fullmatch`); by default
    `*` crosses `/` unless the pattern is `segmented`. `fold` rewrites the literal text
    (never the wildcards, so a fullwidth asterisk can't become one)."""
    crosses = not segmented(pattern) if star_crosses_slash is None else star_crosses_slash
    single_star = _ANY_RUN if crosses else _ANY_RUN_WITHIN_SEGMENT
    one_char = _ONE_CHAR if crosses else _ONE_CHAR_WITHIN_SEGMENT
    parts: list[str] = []
    for piece in _PIECE.findall(pattern):
        if piece == "**":
            parts.append(_ANY_RUN)
        elif piece == "*":
            parts.append(single_star)
        elif piece == "?":
            parts.append(one_char)
        else:
            parts.append(re.escape(fold(piece) if fold else piece))
    return "".join(parts)


@dataclass(frozen=True)
class Glob:
    """A compiled glob; build once at policy load, match many times."""

    pattern: str
    # Matched in the normal form of people's names (owner globs).
    person: bool = False
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)
    # The same pattern with every `*` allowed to cross `/`, only used to explain a miss.
    _lax_regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # DOTALL: a newline in a subject is just another character, not a barrier.
        fold = fold_person if self.person else None
        pattern = self.pattern.strip() if self.person else self.pattern
        strict = glob_to_regex(pattern, fold=fold)
        lax = glob_to_regex(pattern, star_crosses_slash=True, fold=fold)
        object.__setattr__(self, "_regex", re.compile(strict, re.DOTALL))
        object.__setattr__(self, "_lax_regex", re.compile(lax, re.DOTALL))

    def _form(self, value: str) -> str | None:
        if not self.person:
            return value
        try:
            # The API refuses such owners; a glob still never grants one (a line break
            # would otherwise let `*@example.com` match `x@evil.test\n@example.com`).
            check_person(value)
        except InvalidPerson:
            return None
        return normalise_person(value)

    def matches(self, value: str) -> bool:
        form = self._form(value)
        return form is not None and self._regex.fullmatch(form) is not None

    def would_match_with_double_star(self, value: str) -> bool:
        """True when only the `*`-stops-at-`/` rule keeps `value` out: worth a hint."""
        form = self._form(value)
        return form is not None and not self.matches(value) and self._lax_regex.fullmatch(form) is not None

    def explain_miss(self, value: str) -> str:
        hint = ""
        if self.would_match_with_double_star(value):
            hint = " (`*` does not match '/', use `**`)"
        return f"{value!r} does not match {self.pattern!r}{hint}"


def first_match(globs: tuple[Glob, ...], value: str) -> Glob | None:
    return next((glob for glob in globs if glob.matches(value)), None)
