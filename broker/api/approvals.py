"""Approver endpoints: decide on a pending task, list what waits."""

from __future__ import annotations

import uuid
from typing import Any

from flask import Blueprint, jsonify, request

from broker.api.common import caller, json_body, services
from broker.api.render import task_json
from broker.errors import ValidationFailed
from broker.leases.paging import DEFAULT_LIMIT, clamp_limit
from broker.tasks.schemas import Decide

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
    state = request.args.get("state", "pending")
    if state != "pending":
        raise ValidationFailed("'state' supports only 'pending'")
    try:
        limit = clamp_limit(int(request.args.get("limit", DEFAULT_LIMIT)))
    except ValueError:
        raise ValidationFailed("'limit' must be a whole number") from None
    tasks = services().approvals.pending_for(approver, limit)
    return jsonify(items=[task_json(task, with_leases=False) for task in tasks], next_cursor=None)
