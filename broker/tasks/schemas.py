"""Request shapes of the task API (pydantic v2, unknown fields refused)."""

from __future__ import annotations

import json
import re
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from broker.errors import ValidationFailed

# NUL can't be stored by Postgres and bidi/control characters hide what an approver reads.
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u202a-\u202e\u2066-\u2069]")
MAX_CONTEXT_DEPTH = 8


def printable(value: str) -> str:
    if _UNPRINTABLE.search(value):
        raise ValueError("must not contain control or bidirectional-override characters")
    return value


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

    @field_validator("task", "owner", "purpose")
    @classmethod
    def _no_control(cls, value: str) -> str:
        return printable(value)

    @field_validator("owner", "purpose")
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


class TaskRef(_Body):
    task_id: uuid.UUID

    @field_validator("task_id", mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, str):
            return uuid.UUID(value)
        return value


class FinishTask(TaskRef):
    outcome: Literal["succeeded", "failed", "cancelled"] = "succeeded"


class Decide(_Body):
    decision: Literal["approve", "deny"]
    reason: Annotated[str, StringConstraints(min_length=1, max_length=500)]

    @field_validator("reason")
    @classmethod
    def _no_control(cls, value: str) -> str:
        return printable(value)
