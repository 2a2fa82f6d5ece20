"""Operator endpoints: the lease inventory, revocation, the kill switch, tasks and audit."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from flask import Blueprint, jsonify
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from broker.api.common import caller, json_body, query_args, services
from broker.api.render import audit_json, lease_json, task_json
from broker.leases.service import Filters
from broker.models import LEASE_STATES, TASK_STATES
from broker.tasks.schemas import printable

bp = Blueprint("operator", __name__)

Reason = Annotated[str, StringConstraints(min_length=1, max_length=500)]


class ListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    state: str | None = None
    owner: str | None = None
    workload: str | None = None
    task: str | None = None
    task_id: uuid.UUID | None = None
    limit: Annotated[int, Field(ge=1)] | None = None
    cursor: str | None = None

    def filters(self) -> Filters:
        return Filters(self.state, self.owner, self.workload, self.task, self.task_id)


def _one_of(value: str | None, states: tuple[str, ...]) -> str | None:
    if value is not None and value not in states:
        raise ValueError(f"must be one of {', '.join(states)}")
    return value


class LeaseQuery(ListQuery):
    @field_validator("state")
    @classmethod
    def _known(cls, value: str | None) -> str | None:
        return _one_of(value, LEASE_STATES)


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
    limit: Annotated[int, Field(ge=1)] | None = None
    cursor: str | None = None

    @field_validator("state")
    @classmethod
    def _known(cls, value: str | None) -> str | None:
        return _one_of(value, TASK_STATES)

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


class KillSwitchBody(RevokeBody):
    workload: Annotated[str, StringConstraints(min_length=1)] | None = None
    owner: Annotated[str, StringConstraints(min_length=1)] | None = None
    task: Annotated[str, StringConstraints(min_length=1)] | None = None

    @field_validator("workload", "owner", "task")
    @classmethod
    def _printable_filter(cls, value: str | None) -> str | None:
        return None if value is None else printable(value)

    @model_validator(mode="after")
    def _scoped(self) -> KillSwitchBody:
        if self.workload is None and self.owner is None and self.task is None:
            raise ValueError("name at least one of 'workload', 'owner' or 'task'")
        return self


@bp.get("/leases")
def list_leases() -> Any:
    caller("operator")
    query = query_args(LeaseQuery)
    found = services().operator.leases(query.filters(), query.cursor, query.limit)
    return jsonify(items=[lease_json(lease) for lease in found.items], next_cursor=found.next_cursor)


@bp.get("/leases/<uuid:lease_id>")
def get_lease(lease_id: uuid.UUID) -> Any:
    caller("operator")
    return jsonify(lease_json(services().operator.lease(lease_id)))


@bp.post("/leases/<uuid:lease_id>/revoke")
def revoke_lease(lease_id: uuid.UUID) -> Any:
    operator = caller("operator")
    body = json_body(RevokeBody)
    lease = services().operator.revoke_lease(operator, lease_id, body.reason)
    return jsonify(lease_json(lease))


@bp.post("/leases/revoke")
def kill_switch() -> Any:
    operator = caller("operator")
    body = json_body(KillSwitchBody)
    result = services().operator.kill_switch(
        operator, body.reason, workload=body.workload, owner=body.owner, task=body.task
    )
    return jsonify(
        tasks=[str(task_id) for task_id in result.tasks],
        revoked=result.revoked,
        revoke_pending=result.pending,
    )


@bp.get("/tasks")
def list_tasks() -> Any:
    caller("operator")
    query = query_args(TaskQuery)
    found = services().operator.tasks(query.filters(), query.cursor, query.limit)
    return jsonify(items=[task_json(task) for task in found.items], next_cursor=found.next_cursor)


@bp.get("/audit")
def list_audit() -> Any:
    caller("operator")
    query = query_args(AuditQuery)
    found = services().operator.audit(query.filters(), query.since, query.event, query.cursor, query.limit)
    return jsonify(items=[audit_json(row) for row in found.items], next_cursor=found.next_cursor)
