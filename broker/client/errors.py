"""What the SDK raises: one class per problem `code` of the broker's API (docs/api.md).

Callers branch on the class (or on `.code`, which is stable); `.detail` is the broker's
sentence for a person. The broker promises `detail` never holds token text or secret
values, and these classes add none: a traceback of a refused start is safe to log.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


class BrokerError(Exception):
    """Base of everything the client raises on purpose."""


class TokenSourceError(BrokerError):
    """No workload token could be had (missing file or variable, SPIFFE or CI endpoint down)."""


class BrokerUnreachable(BrokerError):
    """The broker did not answer: refused connection, timeout, reset (after the retries)."""


class BrokerAPIError(BrokerError):
    """The broker answered with an error (RFC 9457 problem+json, or something else on the way).

    `status` is the HTTP status, `code` the problem's stable code (`http_error` when the
    answer was not a problem document, e.g. a proxy's 502 page), `detail` its sentence and
    `body` the parsed problem (empty when there was none).
    """

    code_name: str = ""

    def __init__(self, status: int, code: str, detail: str, body: Mapping[str, Any] | None = None) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        self.body: dict[str, Any] = dict(body or {})
        super().__init__(f"{status} {code}: {detail}" if status else f"{code}: {detail}")

    @property
    def rule(self) -> str | None:
        """The policy rule a `policy_denied` or `limit_exceeded` names."""
        value = self.body.get("rule")
        return value if isinstance(value, str) else None


class _RetryLater(BrokerAPIError):
    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        body: Mapping[str, Any] | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(status, code, detail, body)
        self.retry_after = retry_after
        """Seconds the broker asked us to wait (its `Retry-After`), or None."""


class InvalidToken(BrokerAPIError):
    """401 invalid_token: get a fresh token from the issuer, with the broker's audience."""


class Forbidden(BrokerAPIError):
    """403 forbidden: a valid token that may not do this (wrong `use`, not an approver...)."""


class PolicyDenied(BrokerAPIError):
    """403 policy_denied: a policy rule (`.rule`) refused the start; retrying won't help."""


class Locked(BrokerAPIError):
    """403 locked: an operator's lock (`.lock_id`) refuses this start, claim or approval;
    retrying won't help until it is removed or expires."""

    @property
    def lock_id(self) -> str | None:
        value = self.body.get("lock_id")
        return value if isinstance(value, str) else None


class ValidationError(BrokerAPIError):
    """400 validation_error, ttl_exceeds_max and other malformed-request answers."""


class BodyTooLarge(ValidationError):
    """413 body_too_large: the request body is over the broker's `limits.max_body_bytes`."""


class UnsupportedMediaType(ValidationError):
    """415 unsupported_media_type: the body was not sent as `application/json`."""


class IdempotencyKeyReused(BrokerAPIError):
    """422 idempotency_key_reused: this `Idempotency-Key` already started a different request.

    `task_id` names the task the key started; a new request needs a new key.
    """

    @property
    def task_id(self) -> str | None:
        value = self.body.get("task_id")
        return value if isinstance(value, str) else None


class UnknownTask(BrokerAPIError):
    """404 unknown_task: no task type of that name in the policy."""


class NotFound(BrokerAPIError):
    """404 not_found: no such task, or another workload's (the two look the same)."""


class Conflict(BrokerAPIError):
    """409 conflict: the task's state doesn't allow this (claimed twice, lapsed, ended)."""


class StartAnswerLost(Conflict):
    """A start reached the broker but its answer was lost, and the retry found the task it
    made (409 under the same key). Credentials are sent once, so that task was finished
    (`cancelled`) rather than left alive unused; `task_id` names it. Start again."""

    def __init__(self, task_id: str, body: Mapping[str, Any] | None = None) -> None:
        detail = f"the answer to start {task_id} was lost; that task was finished, start again"
        super().__init__(409, "conflict", detail, body)
        self.task_id = task_id


class LimitExceeded(_RetryLater):
    """429 limit_exceeded: a `limits` rule (`.rule`) was reached; `.retry_after` says when to retry."""


class Unavailable(_RetryLater):
    """503 vault_unavailable, database_unavailable, identity_unavailable: nothing was issued."""


class IssuanceFailed(BrokerAPIError):
    """502 issuance_failed: Vault refused to issue; an operator must fix the Vault side."""


class ApprovalDenied(BrokerAPIError):
    """The pending task ended without being approved: denied, lapsed, or ended by someone.

    Raised by the client, not answered by the broker: `code` is `approval_denied` and
    `body` the task document that showed it.
    """

    def __init__(self, task_id: str, detail: str, body: Mapping[str, Any] | None = None) -> None:
        super().__init__(0, "approval_denied", detail, body)
        self.task_id = task_id


class ApprovalTimeout(BrokerAPIError):
    """Nobody decided within the caller's wait. The task may still be pending at the broker.

    `code` is `approval_timeout`; `approvers` lists the approver groups when the task
    document carries them (otherwise it is empty).
    """

    def __init__(
        self,
        task_id: str,
        detail: str,
        body: Mapping[str, Any] | None = None,
        approvers: list[str] | None = None,
    ) -> None:
        super().__init__(0, "approval_timeout", detail, body)
        self.task_id = task_id
        self.approvers = approvers or []


_BY_CODE: dict[str, type[BrokerAPIError]] = {
    "invalid_token": InvalidToken,
    "forbidden": Forbidden,
    "policy_denied": PolicyDenied,
    "locked": Locked,
    "validation_error": ValidationError,
    "ttl_exceeds_max": ValidationError,
    "bad_request": ValidationError,
    "body_too_large": BodyTooLarge,
    "unsupported_media_type": UnsupportedMediaType,
    "idempotency_key_reused": IdempotencyKeyReused,
    "unknown_task": UnknownTask,
    "not_found": NotFound,
    "conflict": Conflict,
    "limit_exceeded": LimitExceeded,
    "vault_unavailable": Unavailable,
    "database_unavailable": Unavailable,
    "identity_unavailable": Unavailable,
    "not_ready": Unavailable,
    "issuance_failed": IssuanceFailed,
}
_BY_STATUS: dict[int, type[BrokerAPIError]] = {
    400: ValidationError,
    401: InvalidToken,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    # A proxy in front may refuse a body before the broker sees it, in its own words.
    413: BodyTooLarge,
    415: UnsupportedMediaType,
    429: LimitExceeded,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
}
_RETRY_LATER = (LimitExceeded, Unavailable)


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds; the broker sends delta-seconds, an HTTP date is ignored."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def from_response(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> BrokerAPIError:
    """The exception for an error answer: its class from the problem's `code`, else the status.

    `body` is the raw answer; anything that isn't a JSON problem document (a proxy's HTML
    page) becomes `http_error`, and its text is not copied into the exception.
    """
    headers = headers or {}
    problem: dict[str, Any] = {}
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        problem = parsed
    code = problem.get("code") if isinstance(problem.get("code"), str) else None
    detail = problem.get("detail") if isinstance(problem.get("detail"), str) else None
    if code is None:
        # Not the broker's problem document (a proxy or load balancer answered): keep only
        # the status, which still says whether waiting may help.
        code, problem = "http_error", {}
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status, BrokerAPIError)
    detail = detail or f"HTTP {status}"
    if issubclass(cls, _RETRY_LATER):
        retry_after = parse_retry_after(_header(headers, "Retry-After"))
        return cls(status, code, detail, problem, retry_after=retry_after)
    return cls(status, code, detail, problem)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return None
