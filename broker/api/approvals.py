"""Approver endpoints: decide on a pending task, list what waits."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from flask import Blueprint, jsonify
from pydantic import BaseModel, ConfigDict, Field

from broker.api.common import caller, json_body, query_args, services
from broker.api.render import task_json
from broker.leases.paging import clamp_limit
from broker.tasks.schemas import Decide

bp = Blueprint("approvals", __name__)


@bp.post("/approvals/<uuid:task_id>")
def decide(task_id: uuid.UUID) -> Any:
    approver = caller("approver")
    body = json_body(Decide)
    task = services().approvals.decide(approver, task_id, body.decision, body.reason)
    return jsonify(task_json(task))


class PendingQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    state: Literal["pending"] = "pending"
    limit: Annotated[int, Field(ge=1)] | None = None
    cursor: str | None = None


@bp.get("/approvals")
def pending() -> Any:
    approver = caller("approver")
    query = query_args(PendingQuery)
    found = services().approvals.pending_for(approver, clamp_limit(query.limit), query.cursor)
    return jsonify(
        items=[task_json(task, with_leases=False) for task in found.items], next_cursor=found.next_cursor
    )
