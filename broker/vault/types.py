"""What the gateway hands out: a task's token, an issued secret and how to revoke it.

Secret values are kept out of every `repr`, so logging one of these never leaks them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal


@dataclass(frozen=True)
class TaskToken:
    """The per-task Vault token. Only `accessor` may be stored or logged."""

    token: str = field(repr=False)
    accessor: str
    expires_at: datetime


@dataclass(frozen=True)
class RevokeHandle:
    """How to revoke one credential: a lease id, or a token accessor (a child token has no
    lease id), or nothing (a path that answered without a lease)."""

    kind: Literal["lease", "token", "none"]
    ref: str


@dataclass(frozen=True)
class IssuedSecret:
    data: dict[str, Any] = field(repr=False)
    expires_at: datetime
    handle: RevokeHandle
    vault_lease_id: str | None
