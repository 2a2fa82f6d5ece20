"""Request rules: which Vault API requests the gateway relays for a `vault_token`
credential with `delivery: gateway` (docs/gateway.md, "Vault API").

    requests:
      - request.method in ["GET", "LIST"]
      - {name: reports-only, when: 'request.path.startsWith("secret/data/reports/")'}

Every rule must be `true` for a request to be relayed. A plain string is named
`requests[0]`, `requests[1]`, ... in refusals and the audit. No `requests:` restricts
nothing beyond the token's own Vault policies (and the gateway's fixed deny-list).

What a rule sees, as `request`:
- `method`: upper case, as Vault reads it: `GET`, `LIST` (also a GET with `list=true`),
  `POST`, `PUT`, `PATCH`, `DELETE`, `HEAD`.
- `path`: the Vault path after `/v1/`, percent-decoded (what Vault routes on), without
  the query string: `secret/data/reports/q3`.

Compiled once, at policy load, like the statement rules (`broker.policy.statements`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from broker.policy.cel import CelActivation, CelCompileError, CelRule, CelVariables, compile_rule
from broker.policy.schema import PathPart, PolicyError, PolicyIssue

REQUEST_VARIABLES = CelVariables(
    names=("request",),
    fields={"request": ("method", "path")},
    sample={"request": {"method": "GET", "path": "secret/data/reports/q3"}},
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_MAX_SOURCE = 4000
# Verdicts kept per distinct (method, path): clients repeat the same reads.
CACHE_SIZE = 1024


@dataclass(frozen=True, slots=True)
class RequestRule:
    name: str
    rule: CelRule


@dataclass(frozen=True, slots=True)
class RequestVerdict:
    allowed: bool
    rule: str | None  # the first rule that refused, None when allowed
    detail: str


class RequestRules:
    """The compiled `requests:` of one credential. Immutable and safe to share."""

    def __init__(self, rules: Sequence[RequestRule]) -> None:
        self.rules: tuple[RequestRule, ...] = tuple(rules)
        self._cached = functools.lru_cache(maxsize=CACHE_SIZE)(self._evaluate)

    def __len__(self) -> int:
        return len(self.rules)

    def evaluate(self, method: str, path: str) -> RequestVerdict:
        """Every rule against the request; an error or a non-bool result refuses (fail closed)."""
        return self._cached(method, path)

    def _evaluate(self, method: str, path: str) -> RequestVerdict:
        if not self.rules:
            return RequestVerdict(True, None, "no request rules")
        activation = CelActivation({"request": {"method": method, "path": path}})
        for rule in self.rules:
            outcome = activation.evaluate(rule.rule)
            if not outcome.passed:
                return RequestVerdict(False, rule.name, outcome.detail)
        return RequestVerdict(True, None, "every rule passed")


def compile_request_rules(
    entries: Sequence[object], path: tuple[PathPart, ...] = ("requests",)
) -> RequestRules:
    """Compile a credential's `requests:` entries (a CEL string or `{name, when}` each);
    raise `PolicyError` listing every bad entry, located under `path`."""
    rules: list[RequestRule] = []
    issues: list[PolicyIssue] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        where = (*path, index)
        name, source, problem = _entry(entry, index)
        if problem is None and name in seen:
            problem = f"duplicate rule name {name!r}"
        if problem is not None:
            issues.append(PolicyIssue(where, problem))
            continue
        seen.add(name)
        try:
            rules.append(RequestRule(name, compile_rule(source, REQUEST_VARIABLES)))
        except CelCompileError as error:
            issues.append(PolicyIssue((*where, "when") if isinstance(entry, Mapping) else where, str(error)))
    if issues:
        raise PolicyError("the request rules are not valid", issues)
    return RequestRules(rules)


def _entry(entry: object, index: int) -> tuple[str, str, str | None]:
    """(name, CEL source, problem) of one entry."""
    if isinstance(entry, str):
        name, source = f"requests[{index}]", entry
    elif isinstance(entry, Mapping):
        extra = set(entry) - {"name", "when"}
        if extra:
            return "", "", f"unknown key {sorted(map(str, extra))[0]!r} (a rule has 'name' and 'when')"
        given_name, given_source = entry.get("name"), entry.get("when")
        if not isinstance(given_name, str) or not _NAME.match(given_name):
            return "", "", "'name' must be 1-63 letters, digits, '_', '.' or '-'"
        if not isinstance(given_source, str):
            return "", "", "'when' must be a CEL expression (a string)"
        name, source = given_name, given_source
    else:
        return "", "", "a rule is a CEL expression, or a mapping with 'name' and 'when'"
    if not source.strip() or len(source) > _MAX_SOURCE:
        return "", "", f"a rule must be 1-{_MAX_SOURCE} characters of CEL"
    return name, source, None


@functools.cache
def refuse_all() -> RequestRules:
    """For a credential the policy no longer delivers through the gateway: nothing passes."""
    return compile_request_rules([{"name": "no-longer-in-the-policy", "when": "false"}])


__all__ = [
    "REQUEST_VARIABLES",
    "RequestRules",
    "RequestVerdict",
    "compile_request_rules",
    "refuse_all",
]
