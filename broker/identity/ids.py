"""Workload ids: one namespace for every configured issuer (docs/contract.md §3).

An id is what tasks are scoped by (a workload reads, finishes and claims only tasks whose
`workload` equals its id), so two issuers must never be able to produce the same id:

- a `spiffe` issuer's id is the bare SPIFFE ID, `spiffe://<trust domain>/<path>`;
- an `oidc` issuer's id is `<issuer name>:<sub>`.

Why these never coincide for two different issuers A and B, given the config rules
(`broker/config.py`: names match `ISSUER_NAME_PATTERN` and are unique, `spiffe` is a
reserved name, one `spiffe` issuer per trust domain):

1. OIDC and OIDC. A name holds no `:`, so the id's first `:` ends the name: the id
   `n:s` determines `n`. Equal ids mean equal names, and names are unique, so A = B.
2. OIDC and SPIFFE. A SPIFFE id starts `spiffe:`, so its text before the first `:` is
   `spiffe`; an OIDC id's is its issuer's name, which is never `spiffe`. They differ.
3. SPIFFE and SPIFFE. A SPIFFE issuer accepts only IDs in its own trust domain, the text
   between `spiffe://` and the next `/`. Equal ids mean equal trust domains, and each
   trust domain has one issuer, so A = B.

Within one issuer, distinct subjects give distinct ids (the subject is the id's tail, or
the whole id), so the map (issuer, subject) -> id is injective. Names are lowercase, so
this also holds for the case-folded ids that approvals compare (1 and 2 read only the
name, which case-folding leaves as it is).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from broker.config import ISSUER_NAME_PATTERN, RESERVED_ISSUER_NAMES, IssuerSettings

SPIFFE_SCHEME = "spiffe"
_NAME = re.compile(ISSUER_NAME_PATTERN)


def workload_id(issuer: IssuerSettings, subject: str) -> str:
    """The id of `subject` as vouched for by `issuer` (a SPIFFE `sub` already validated)."""
    if issuer.kind == "spiffe":
        return subject
    return f"{issuer.name}:{subject}"


def check_namespace(issuers: Sequence[IssuerSettings]) -> None:
    """Raise `ValueError` unless the module docstring's proof holds for `issuers`.

    The config validates the same rules; this re-check keeps them true whatever built the
    settings objects (tests, `model_construct`, a future loader).
    """
    names = [issuer.name for issuer in issuers]
    bad = sorted(name for name in names if not _NAME.match(name) or name in RESERVED_ISSUER_NAMES)
    if bad:
        raise ValueError(f"issuer names {bad} could make workload ids collide")
    if len(set(names)) != len(names):
        raise ValueError("two issuers share one name")
    domains = [issuer.trust_domain for issuer in issuers if issuer.kind == "spiffe"]
    if len(set(domains)) != len(domains):
        raise ValueError("two spiffe issuers share one trust domain")
