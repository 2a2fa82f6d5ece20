"""The broker's domain errors: what a caller can be told went wrong, free of any web framework.

Each error's `detail` is written for the caller and never carries exception text, Vault
responses or secret values. Other layers raise their own errors (`identity.InvalidToken`,
`vault.VaultUnavailable`, `db.DatabaseUnavailable`); `broker.api.problems` maps all of them
to HTTP in one table.
"""

from __future__ import annotations

from typing import Any


class BrokerError(Exception):
    """Base class. `extra` fields are added to the problem body (e.g. the failed policy rule)."""

    title = "Internal error"

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.extra = extra


class ValidationFailed(BrokerError):
    title = "The request is not valid"


class TtlExceedsMax(BrokerError):
    title = "The requested TTL exceeds the task's maximum"

    def __init__(self, requested: int, max: int) -> None:
        super().__init__(f"ttl_seconds {requested} exceeds this task type's maximum of {max}")
        self.requested = requested
        self.max = max


class Forbidden(BrokerError):
    title = "This identity may not do that"


class PolicyDenied(BrokerError):
    title = "The policy denied this request"


class Locked(BrokerError):
    """An operator's lock refuses this start, claim or approval; the body names the lock."""

    title = "An operator's lock refuses this"

    def __init__(self, lock_id: object) -> None:
        super().__init__(
            f"lock {lock_id} refuses this workload, owner, task type or issuer; an operator removes it",
            lock_id=str(lock_id),
        )
        self.lock_id = str(lock_id)


class NotFound(BrokerError):
    title = "Not found"


class UnknownTask(BrokerError):
    title = "No such task type in the policy"

    def __init__(self, name: str) -> None:
        super().__init__(f"no task type named '{name}' in the policy")
        self.name = name


class Conflict(BrokerError):
    title = "The request conflicts with the current state"


class MalformedBody(BrokerError):
    """The body's HTTP framing is broken (a bad chunk size, a missing CRLF, a cut-off chunk)."""

    title = "Bad request"


class IdempotencyKeyReused(BrokerError):
    title = "The Idempotency-Key was used for a different request"


class BodyTooLarge(BrokerError):
    title = "The request body is too large"


class UnsupportedMediaType(BrokerError):
    title = "Send application/json"


class LimitExceeded(BrokerError):
    title = "A policy limit was reached"

    def __init__(self, detail: str | None = None, *, retry_after: int = 1, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.retry_after = max(1, retry_after)


class IssuanceFailed(BrokerError):
    title = "Vault refused to issue a credential"
