"""Operator endpoints: the lease inventory, revocation, the kill switch, locks, tasks and audit."""

from __future__ import annotations

import uuid
from typing import Any

from flask import Blueprint, jsonify

from broker.api.common import caller, json_body, query_args, services
from broker.api.render import audit_json, kill_json, lease_json, lock_json, task_json
from broker.api.schemas import (
    AuditQuery,
    KillSwitchBody,
    LeaseQuery,
    LockBody,
    LockQuery,
    RevokeBody,
    TaskQuery,
)

bp = Blueprint("operator", __name__)


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
    result = services().operator.kill_switch(operator, body.reason, body.targets(), lock=body.lock)
    return jsonify(kill_json(result))


@bp.post("/locks")
def add_lock() -> Any:
    operator = caller("operator")
    body = json_body(LockBody)
    lock, ended = services().operator.lock_and_end(
        operator, body.targets(), reason=body.reason, expires_in=body.expires_in
    )
    return jsonify(lock_json(lock) | {"revocation": kill_json(ended)["revocation"]}), 201


@bp.get("/locks")
def list_locks() -> Any:
    caller("operator")
    query = query_args(LockQuery)
    found = services().operator.locks(include_ended=query.state == "all")
    return jsonify(items=[lock_json(lock) for lock in found])


@bp.delete("/locks/<uuid:lock_id>")
def remove_lock(lock_id: uuid.UUID) -> Any:
    operator = caller("operator")
    return jsonify(lock_json(services().operator.remove_lock(operator, lock_id)))


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
