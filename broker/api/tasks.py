"""Workload endpoints: /task/start, /task/claim, /task/finish, GET /task/{id}."""

from __future__ import annotations

import uuid
from typing import Any

from flask import Blueprint, jsonify, request

from broker import logs
from broker.api.common import caller, json_body, services
from broker.api.render import credentials_json, task_json, waiting_json
from broker.api.schemas import FinishTask, StartTask, TaskRef, idempotency_key
from broker.tasks.service import TaskService

bp = Blueprint("tasks", __name__)


def task_service() -> TaskService:
    return services().tasks


@bp.post("/task/start")
def start() -> Any:
    identity = caller("workload")
    key = idempotency_key(request.headers.getlist("Idempotency-Key"))
    body = json_body(StartTask)
    body.check_context_size(services().settings.limits.max_context_bytes)
    result = task_service().start(identity, body.request(), idempotency_key=key)
    logs.annotate(task_id=str(result.task.id))
    if result.credentials is None:
        return jsonify(waiting_json(result.task)), 202
    response = task_json(result.task)
    response["credentials"] = credentials_json(result.credentials)
    return jsonify(response), 201


@bp.post("/task/claim")
def claim() -> Any:
    identity = caller("workload")
    body = json_body(TaskRef)
    result = task_service().claim(identity, body.task_id)
    response = task_json(result.task)
    response["credentials"] = credentials_json(result.credentials or {})
    return jsonify(response)


@bp.post("/task/finish")
def finish() -> Any:
    identity = caller("workload")
    body = json_body(FinishTask)
    return jsonify(task_json(task_service().finish(identity, body.task_id, body.outcome)))


@bp.get("/task/<uuid:task_id>")
def read(task_id: uuid.UUID) -> Any:
    identity = caller("workload", "operator")
    return jsonify(task_json(task_service().get(identity, task_id)))
