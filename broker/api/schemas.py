"""Request shapes of every endpoint: tasks, approvals, operators (pydantic v2, unknown fields refused)."""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from broker.errors import ValidationFailed
from broker.identity.people import check_person, check_text, normalise_person
from broker.ledger import Filters, Targets
from broker.lifecycle import LEASE_STATES, TASK_STATES, Outcome
from broker.paging import MAX_LIMIT
from broker.policy import TaskRequest

MAX_CONTEXT_DEPTH = 8


def printable(value: str) -> str:
    """Refuse control characters (tab and line breaks too), bidi and invisible ones.

    NUL can't be stored by Postgres, and the rest hide or reorder what an approver reads:
    a line break in a purpose can fake a second field, a bidi override reverses text.
    """
    check_text(value)
    return value


def person(value: str) -> str:
    """An owner: refused if it hides characters or mixes look-alike scripts, else normalised.

    Stored, matched against `owners` globs and compared with approvers in this one form, so
    `Alice@Example.com ` and `alice@example.com` are one owner everywhere (the kill
    switch and the operator filters included).
    """
    check_person(value)
    return normalise_person(value)


def _depth(value: Any, level: int = 0) -> int:
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


Purpose = Annotated[str, StringConstraints(min_length=8, max_length=500, strip_whitespace=False)]
Owner = Annotated[str, StringConstraints(min_length=1, max_length=200)]


class StartTask(_Body):
    task: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    owner: Owner
    purpose: Purpose
    ttl_seconds: Annotated[int, Field(gt=0)] | None = None
    context: dict[str, Any] = Field(default_factory=dict)

    @field_validator("task", "purpose")
    @classmethod
    def _no_control(cls, value: str) -> str:
        return printable(value)

    @field_validator("owner")
    @classmethod
    def _one_person(cls, value: str) -> str:
        return person(value)

    @field_validator("purpose")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("context")
    @classmethod
    def _shallow(cls, value: dict[str, Any]) -> dict[str, Any]:
        if _depth(value) > MAX_CONTEXT_DEPTH:
            raise ValueError(f"must nest at most {MAX_CONTEXT_DEPTH} levels")
        return value

    def check_context_size(self, limit: int) -> None:
        """`limits.max_context_bytes`: the context is stored and shown to approvers."""
        if len(json.dumps(self.context, separators=(",", ":"))) > limit:
            raise ValidationFailed(f"'context': must be at most {limit} bytes of JSON")

    def request(self) -> TaskRequest:
        return TaskRequest(
            task=self.task,
            owner=self.owner,
            purpose=self.purpose,
            ttl_seconds=self.ttl_seconds,
            context=self.context,
        )


MAX_IDEMPOTENCY_KEY = 255
# A structured field string (RFC 8941 §3.3.3): printable ASCII, `"` and `\` escaped.
_QUOTED_KEY = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')
# Bare, as most clients send it. No comma: WSGI joins a repeated header with ", ", and a
# key sent twice must not pass as one key.
_BARE_KEY = re.compile(r"[\x20-\x2b\x2d-\x7e]*")


def idempotency_key(values: list[str]) -> str | None:
    """The Idempotency-Key header (draft-ietf-httpapi-idempotency-key-header): opaque,
    1 to 255 printable ASCII characters, once; a structured field string or bare."""
    if not values:
        return None
    value = values[0]
    if value.startswith('"'):  # then it is a quoted string, or nothing
        quoted = _QUOTED_KEY.fullmatch(value)
        value = re.sub(r"\\(.)", r"\1", quoted.group(1)) if quoted else ""
    elif not _BARE_KEY.fullmatch(value):
        value = ""
    if len(values) > 1 or not 0 < len(value) <= MAX_IDEMPOTENCY_KEY:
        raise ValidationFailed(
            f"'Idempotency-Key': must be sent once, 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII"
            ' characters, bare (no comma) or as a quoted string ("...")'
        )
    return value


class TaskRef(_Body):
    task_id: uuid.UUID

    @field_validator("task_id", mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, str):
            return uuid.UUID(value)
        return value


class FinishTask(TaskRef):
    outcome: Outcome = "succeeded"


class Decide(_Body):
    decision: Literal["approve", "deny"]
    reason: Annotated[str, StringConstraints(min_length=1, max_length=500)]

    @field_validator("reason")
    @classmethod
    def _no_control(cls, value: str) -> str:
        return printable(value)


_PAGE_SIZE = f"must be a whole number of 1 or more (more than {MAX_LIMIT} is read as {MAX_LIMIT})"


def _page_size(value: Any) -> Any:
    """`limit`: plain decimal digits, at least 1; above MAX_LIMIT is clamped (docs/api.md#paging).

    Clamped here, at parsing, so every list gets the same page size from one place.
    pydantic's lax int would also take "+5", " 5", "1_000" and "5.0".
    """
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit()):
            raise ValueError(_PAGE_SIZE)
        # Long enough to be over the cap whatever it says; no need to parse it all.
        value = int(value) if len(value) <= 9 else MAX_LIMIT + 1
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(_PAGE_SIZE)
        return min(value, MAX_LIMIT)
    return value


PageLimit = Annotated[int, BeforeValidator(_page_size)]


# Approvers


class PendingQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    state: Literal["pending"] = "pending"
    limit: PageLimit | None = None
    cursor: str | None = None


# Operators

Reason = Annotated[str, StringConstraints(min_length=1, max_length=500)]


class ListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    state: str | None = None
    owner: str | None = None
    workload: str | None = None
    task: str | None = None
    task_id: uuid.UUID | None = None
    limit: PageLimit | None = None
    cursor: str | None = None

    @field_validator("owner")
    @classmethod
    def _owner_form(cls, value: str | None) -> str | None:
        # Owners are stored normalised (`person`); a filter is matched in the same form.
        return None if value is None else person(value)

    def filters(self) -> Filters:
        return Filters(self.state, self.owner, self.workload, self.task, self.task_id)


def _one_of(value: str | None, states: tuple[str, ...]) -> str | None:
    if value is not None and value not in states:
        raise ValueError(f"must be one of {', '.join(states)}")
    return value


class LeaseQuery(ListQuery):
    task_state: str | None = None

    @field_validator("state")
    @classmethod
    def _known(cls, value: str | None) -> str | None:
        return _one_of(value, LEASE_STATES)

    @field_validator("task_state")
    @classmethod
    def _known_task_state(cls, value: str | None) -> str | None:
        return _one_of(value, TASK_STATES)

    def filters(self) -> Filters:
        return Filters(self.state, self.owner, self.workload, self.task, self.task_id, self.task_state)


class TaskQuery(ListQuery):
    @field_validator("state")
    @classmethod
    def _known(cls, value: str | None) -> str | None:
        return _one_of(value, TASK_STATES)


class AuditQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task_id: uuid.UUID | None = None
    task: str | None = None
    state: str | None = None
    owner: str | None = None
    workload: str | None = None
    since: datetime | None = None
    event: str | None = None
    limit: PageLimit | None = None
    cursor: str | None = None

    @field_validator("state")
    @classmethod
    def _known(cls, value: str | None) -> str | None:
        return _one_of(value, TASK_STATES)

    @field_validator("owner")
    @classmethod
    def _owner_form(cls, value: str | None) -> str | None:
        return None if value is None else person(value)

    @field_validator("since", mode="before")
    @classmethod
    def _rfc3339(cls, value: Any) -> Any:
        # Not pydantic's lax parsing, which takes a bare number as a Unix time and a time
        # without an offset as naive: the API speaks RFC 3339, and a guess shifts the window.
        if not isinstance(value, str):
            return value
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(
                "must be an RFC 3339 time such as 2026-12-02T15:00:00Z (write + as %2B)"
            ) from None
        if parsed.tzinfo is None:
            raise ValueError("must carry its offset, Z or +hh:mm (write + as %2B)")
        return parsed

    def filters(self) -> Filters:
        """`task` and `state` select events of tasks of that type or in that state."""
        return Filters(self.state, self.owner, self.workload, self.task, self.task_id)


class RevokeBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    reason: Reason

    @field_validator("reason")
    @classmethod
    def _printable(cls, value: str) -> str:
        return printable(value)


def _target(value: str) -> str:
    """A lock's or the kill switch's target: a name matched exactly, never a pattern."""
    if not value.strip():
        raise ValueError("must not be empty or blank")
    if "*" in value:
        raise ValueError("is matched exactly: '*' is no wildcard here (a lock on everything is no lock)")
    return printable(value)


Target = Annotated[str, StringConstraints(min_length=1, max_length=500)]


class _Targets(RevokeBody):
    workload: Target | None = None
    owner: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    task: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    issuer: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None

    @field_validator("workload", "task", "issuer")
    @classmethod
    def _printable_filter(cls, value: str | None) -> str | None:
        return None if value is None else _target(value)

    @field_validator("owner")
    @classmethod
    def _owner_form(cls, value: str | None) -> str | None:
        return None if value is None else person(_target(value))

    @model_validator(mode="after")
    def _scoped(self) -> Any:
        if self.workload is None and self.owner is None and self.task is None and self.issuer is None:
            raise ValueError("name at least one of 'workload', 'owner', 'task' or 'issuer'")
        return self

    def targets(self) -> Targets:
        return Targets(workload=self.workload, owner=self.owner, task=self.task, issuer=self.issuer)


class KillSwitchBody(_Targets):
    # Also add a lock on the same targets and reason, in the same call.
    lock: bool = False


class LockBody(_Targets):
    # Seconds from now (by the database's clock) until the lock lets starts through again.
    expires_in: Annotated[int, Field(gt=0, le=366 * 24 * 3600)] | None = None


class LockQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # `live` (the default): locks that refuse now; `all`: removed and expired ones too.
    state: Literal["live", "all"] = "live"
