"""What can go wrong talking to Vault/OpenBao, in two kinds the API can act on.

`VaultUnavailable` means "try again later" (503 `vault_unavailable`, or a lease left
`revoke_pending`); `VaultRejected` means Vault understood and said no (issuance failed).
Messages are built only from the operation, the HTTP status and a short reason picked
from a list of known Vault phrases: never from a request or response body, so `str()`
of any of these is safe to log, audit and return.
"""

from __future__ import annotations


class VaultError(Exception):
    """Base class. `operation` names what was attempted, e.g. `issue database/creds/ro`."""

    def __init__(self, operation: str, reason: str, *, status: int | None = None) -> None:
        self.operation = operation
        self.reason = reason
        self.status = status
        where = f" (HTTP {status})" if status is not None else ""
        super().__init__(f"vault {operation}: {reason}{where}")


class VaultUnavailable(VaultError):
    """Connection refused or timed out, sealed, 5xx, 429: nothing was decided, retry later.

    `sent` is False when the request never reached Vault (no connection could be made):
    then nothing at all was applied, and the next call would most likely fail the same way.
    """

    def __init__(self, operation: str, reason: str, *, status: int | None = None, sent: bool = True) -> None:
        super().__init__(operation, reason, status=status)
        self.sent = sent


class VaultRejected(VaultError):
    """A 4xx answer: permission denied, unknown role, invalid request."""
