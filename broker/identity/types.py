"""What a verified attestation tells the rest of the broker."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

# Defined with the config that grants it; re-exported here for the code that checks it.
from broker.config import IdentityUse

__all__ = ["Identity", "IdentityUse"]


@dataclass(frozen=True)
class Identity:
    """A caller proven by a verified JWT.

    `id` is `<issuer name>:<sub>`, or the bare SPIFFE ID for `spiffe` issuers (docs/contract.md §3);
    ids of different issuers never coincide (broker/identity/ids.py).
    """

    id: str
    issuer_name: str
    issuer: str
    subject: str
    kind: Literal["spiffe", "oidc"]
    uses: frozenset[IdentityUse]
    groups: frozenset[str]
    claims: Mapping[str, Any] = field(repr=False)
    expires_at: datetime
    jti: str | None = None

    def may(self, use: IdentityUse) -> bool:
        return use in self.uses
