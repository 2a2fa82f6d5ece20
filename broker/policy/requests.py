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
from collections.abc import Sequence

from broker.policy.cel import CelActivation, CelVariables
from broker.policy.named_rules import NamedRule, RuleVerdict, compile_named_rules
from broker.policy.schema import PathPart

REQUEST_VARIABLES = CelVariables(
    names=("request",),
    fields={"request": ("method", "path")},
    sample={"request": {"method": "GET", "path": "secret/data/reports/q3"}},
)
# Verdicts kept per distinct (method, path): clients repeat the same reads.
CACHE_SIZE = 1024


RequestRule = NamedRule


RequestVerdict = RuleVerdict


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
    return RequestRules(compile_named_rules(entries, path, variables=REQUEST_VARIABLES))


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
