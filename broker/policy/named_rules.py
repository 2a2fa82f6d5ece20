"""Lists of named CEL rules, as a credential's `statements:` and `requests:` hold them.

An entry is a CEL string, named by its position (`statements[0]`, `requests[1]`, ...), or
a mapping `{name, when}`. Every bad entry is reported at once, located under its path, so
`broker policy check` names them all; a name may not repeat, and a family may reserve
names of its own (the statement rules' `parse`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from broker.policy.cel import CelCompileError, CelRule, CelVariables, compile_rule
from broker.policy.schema import PathPart, PolicyError, PolicyIssue

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_MAX_SOURCE = 4000


@dataclass(frozen=True, slots=True)
class NamedRule:
    name: str
    rule: CelRule


@dataclass(frozen=True, slots=True)
class RuleVerdict:
    """A list of named rules' answer for one input: every rule must pass."""

    allowed: bool
    rule: str | None  # the first rule that refused, None when allowed
    detail: str


def compile_named_rules(
    entries: Sequence[object],
    path: tuple[PathPart, ...],
    *,
    variables: CelVariables,
    reserved: Mapping[str, str] | None = None,
) -> tuple[NamedRule, ...]:
    """Compile `entries` (the list at `path`, whose last part names the family, e.g.
    `statements`); raise `PolicyError` listing every bad entry. `reserved`: names an entry
    may not take, each with the reason."""
    family = str(path[-1]) if path else "rules"
    rules: list[NamedRule] = []
    issues: list[PolicyIssue] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        where = (*path, index)
        name, source, problem = _entry(entry, f"{family}[{index}]", reserved or {})
        if problem is None and name in seen:
            problem = f"duplicate rule name {name!r}"
        if problem is not None:
            issues.append(PolicyIssue(where, problem))
            continue
        seen.add(name)
        try:
            rules.append(NamedRule(name, compile_rule(source, variables)))
        except CelCompileError as error:
            issues.append(PolicyIssue((*where, "when") if isinstance(entry, Mapping) else where, str(error)))
    if issues:
        raise PolicyError(f"the {family.rstrip('s')} rules are not valid", issues)
    return tuple(rules)


def _entry(entry: object, default_name: str, reserved: Mapping[str, str]) -> tuple[str, str, str | None]:
    """(name, CEL source, problem) of one entry."""
    if isinstance(entry, str):
        name, source = default_name, entry
    elif isinstance(entry, Mapping):
        extra = set(entry) - {"name", "when"}
        if extra:
            return "", "", f"unknown key {sorted(map(str, extra))[0]!r} (a rule has 'name' and 'when')"
        given_name, given_source = entry.get("name"), entry.get("when")
        if not isinstance(given_name, str) or not _NAME.match(given_name):
            return "", "", "'name' must be 1-63 letters, digits, '_', '.' or '-'"
        if given_name in reserved:
            return "", "", f"{given_name!r} is reserved ({reserved[given_name]})"
        if not isinstance(given_source, str):
            return "", "", "'when' must be a CEL expression (a string)"
        name, source = given_name, given_source
    else:
        return "", "", "a rule is a CEL expression, or a mapping with 'name' and 'when'"
    if not source.strip() or len(source) > _MAX_SOURCE:
        return "", "", f"a rule must be 1-{_MAX_SOURCE} characters of CEL"
    return name, source, None
