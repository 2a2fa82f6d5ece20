"""Approver endpoints: decide on a pending task, list what waits."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request

from broker.api.common import caller, json_body, services
from broker.api.render import task_json
from broker.api.tasks import parse_task_id
from broker.errors import ValidationFailed
from broker.tasks.schemas import Decide

bp = Blueprint("approvals", __name__)


@bp.post("/approvals/<task_id>")
def decide(task_id: str) -> Any:
    approver = caller("approver")
    body = json_body(Decide)
    task = services().approvals.decide(approver, parse_task_id(task_id), body.decision, body.reason)
    return jsonify(task_json(task))


@bp.get("/approvals")
def pending() -> Any:
    approver = caller("approver")
    state = request.args.get("state", "pending")
    if state != "pending":
        raise ValidationFailed("'state' supports only 'pending'")
    tasks = services().approvals.pending_for(approver)
    return jsonify(items=[task_json(task, with_leases=False) for task in tasks], next_cursor=None)
