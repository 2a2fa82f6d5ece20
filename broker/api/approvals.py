"""Approver endpoints: decide on a pending task, list what waits."""

from __future__ import annotations

import uuid
from typing import Any

from flask import Blueprint, jsonify

from broker.api.common import caller, json_body, query_args, services
from broker.api.render import pending_json, task_json
from broker.api.schemas import Decide, PendingQuery
from broker.paging import clamp_limit

bp = Blueprint("approvals", __name__)


@bp.post("/approvals/<uuid:task_id>")
def decide(task_id: uuid.UUID) -> Any:
    approver = caller("approver")
    body = json_body(Decide)
    task = services().approvals.decide(approver, task_id, body.decision, body.reason)
    return jsonify(task_json(task))


@bp.get("/approvals")
def pending() -> Any:
    approver = caller("approver")
    query = query_args(PendingQuery)
    found = services().approvals.pending_for(approver, clamp_limit(query.limit), query.cursor)
    return jsonify(items=[pending_json(item) for item in found.items], next_cursor=found.next_cursor)


@bp.get("/approvals/<uuid:task_id>")
def pending_one(task_id: uuid.UUID) -> Any:
    approver = caller("approver")
    return jsonify(pending_json(services().approvals.pending_one(approver, task_id)))
