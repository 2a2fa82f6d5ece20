"""The API document (OpenAPI 3.1), built from the same pydantic models that parse requests."""

from __future__ import annotations

from functools import cache
from typing import Any

from broker import __version__
from broker.api.catalogue import CATALOGUE_SCHEMA
from broker.api.schemas import (
    MAX_IDEMPOTENCY_KEY,
    Decide,
    FinishTask,
    KillSwitchBody,
    LockBody,
    RevokeBody,
    StartTask,
    TaskRef,
)
from broker.lifecycle import LEASE_STATES, TASK_STATES
from broker.paging import DEFAULT_LIMIT, MAX_LIMIT

_TIME = {"type": ["string", "null"], "format": "date-time"}
_STR = {"type": "string"}
_NSTR = {"type": ["string", "null"]}

LEASE = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "format": "uuid"}, "task_id": {"type": "string", "format": "uuid"},
        "task": _STR, "name": _STR, "kind": _STR, "workload": _STR, "owner": _STR, "purpose": _STR,
        "state": {"enum": list(LEASE_STATES)}, "issued_at": _TIME, "expires_at": _TIME,
        "revoked_at": _TIME, "revoke_attempts": {"type": "integer"}, "last_error": _NSTR,
    },
}  # fmt: skip
TASK = {
    "type": "object",
    "properties": {
        "task_id": {"type": "string", "format": "uuid"}, "task": _STR,
        "state": {"enum": list(TASK_STATES)}, "workload": _STR, "owner": _STR, "purpose": _STR,
        "context": {"type": "object"}, "created_at": _TIME, "expires_at": _TIME,
        "finished_at": _TIME, "outcome": {"enum": ["succeeded", "failed", "cancelled", None]},
        "leases": {"type": "array", "items": {"$ref": "#/components/schemas/Lease"}},
        "credentials": {
            "type": "object",
            "description": "Only in /task/start (201) and /task/claim answers.",
            "additionalProperties": {
                "type": "object",
                "properties": {"kind": _STR, "data": {"type": "object"}, "expires_at": _TIME},
            },
        },
    },
}  # fmt: skip
AUDIT = {
    "type": "object",
    "properties": {
        "id": _STR, "at": _TIME, "event": _STR, "actor": _STR, "task_id": _NSTR,
        "lease_id": _NSTR, "owner": _NSTR, "purpose": _NSTR, "detail": {"type": "object"},
    },
}  # fmt: skip
PROBLEM = {
    "type": "object",
    "required": ["type", "title", "status", "detail", "code"],
    "properties": {"type": _STR, "title": _STR, "status": {"type": "integer"}, "detail": _STR, "code": _STR},
}


# Clamped, not refused (docs/api.md#paging): so no `maximum`, which a client generator would
# turn into a refusal of its own.
LIMIT = {
    "name": "limit",
    "in": "query",
    "description": f"Page size, default {DEFAULT_LIMIT}; values above {MAX_LIMIT} are read as {MAX_LIMIT}.",
    "schema": {"type": "integer", "minimum": 1, "default": DEFAULT_LIMIT},
}
AUDIT_FILTERS = [
    {"name": name, "in": "query", "schema": {"type": "string"}}
    for name in ("task_id", "owner", "workload", "event", "cursor")
] + [
    {"name": "since", "in": "query", "schema": {"type": "string", "format": "date-time"}},
    LIMIT,
]


def _list_of(ref: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"$ref": ref}}, "next_cursor": _NSTR},
    }


def _body(name: str) -> dict[str, Any]:
    return {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
    }


def _answer(description: str, ref: str | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description}
    if ref:
        answer["content"] = {"application/json": {"schema": {"$ref": ref}}}
    return answer


ERRORS = {
    "default": {
        "description": "Any error, with a stable `code`",
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
}
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": (
        "Opaque, 1 to 255 printable ASCII characters, bare (no comma) or quoted. The same workload"
        " and key with the same body within the task's TTL answer from the task it started and"
        " never issue again: 202 again while it waits for approval, else 409 `conflict` with"
        " `task_id` and `state` (credentials are sent once); with another body, 422"
        " `idempotency_key_reused`. See docs/api.md#idempotent-starts."
    ),
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY},
}
FILTERS = [
    {"name": name, "in": "query", "schema": {"type": "string"}}
    for name in ("state", "owner", "workload", "task", "task_id", "cursor")
] + [LIMIT]
LEASE_FILTERS = [*FILTERS, {"name": "task_state", "in": "query", "schema": {"enum": list(TASK_STATES)}}]
PENDING = [
    {"name": "state", "in": "query", "schema": {"enum": ["pending"]}},
    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
    LIMIT,
]


def _op(summary: str, responses: dict[str, Any], body: str | None = None, **extra: Any) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": {**responses, **ERRORS}, **extra}
    if body:
        operation["requestBody"] = _body(body)
    return operation


@cache
def document() -> dict[str, Any]:
    task_ref, lease_ref = "#/components/schemas/Task", "#/components/schemas/Lease"
    id_param = [
        {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
    ]
    schemas: dict[str, Any] = {"Task": TASK, "Lease": LEASE, "AuditEvent": AUDIT, "Problem": PROBLEM}
    for model in (StartTask, FinishTask, TaskRef, Decide, RevokeBody, KillSwitchBody, LockBody):
        schemas[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
    bearer: list[dict[str, list[str]]] = [{"bearer": []}]
    paths = {
        "/task/start": {"post": _op("Start a task (workload)", {
            "201": _answer("Active, with credentials", task_ref),
            "202": _answer("Pending approval (also a retry of it with its Idempotency-Key)"),
            "409": _answer("A retry with an Idempotency-Key whose task is issuing, active or ended"),
            "422": _answer("The Idempotency-Key was used with a different request")},
            "StartTask", parameters=[IDEMPOTENCY_KEY], security=bearer)},
        "/task/claim": {"post": _op("Claim an approved task's credentials, once", {
            "200": _answer("Active, with credentials", task_ref)}, "TaskRef", security=bearer)},
        "/task/finish": {"post": _op("Finish a task; every lease is revoked before the answer", {
            "200": _answer("The ended task", task_ref)}, "FinishTask", security=bearer)},
        "/task/{id}": {"get": _op("Read a task (its workload, or an operator)", {
            "200": _answer("The task", task_ref)}, parameters=id_param, security=bearer)},
        "/task-types": {"get": _op("Task types this workload may start (no Vault details)", {
            "200": _answer("The catalogue", "#/components/schemas/TaskTypeList")}, security=bearer)},
        "/approvals/{id}": {"post": _op("Approve or deny a pending task", {
            "200": _answer("The task", task_ref)}, "Decide", parameters=id_param, security=bearer)},
        "/approvals": {"get": _op("Tasks waiting for this approver", {
            "200": _answer("A list", "#/components/schemas/TaskList")}, parameters=PENDING, security=bearer)},
        "/leases": {"get": _op("The lease inventory (operator)", {
            "200": _answer("A page", "#/components/schemas/LeaseList")}, parameters=LEASE_FILTERS,
            security=bearer)},
        "/leases/{id}": {"get": _op("One lease (operator)", {
            "200": _answer("The lease", lease_ref)}, parameters=id_param, security=bearer)},
        "/leases/{id}/revoke": {"post": _op("Revoke one lease (operator)", {
            "200": _answer("The lease", lease_ref)}, "RevokeBody", parameters=id_param, security=bearer)},
        "/leases/revoke": {"post": _op("Kill switch: end by workload, owner, task or issuer (operator)", {
            "200": _answer("The tasks ended; the scheduler revokes their leases")}, "KillSwitchBody",
            security=bearer)},
        "/locks": {
            "post": _op("Lock: refuse matching starts, claims and approvals; end open tasks (operator)", {
                "201": _answer("The lock, with a revocation block")}, "LockBody", security=bearer),
            "get": _op("Live locks; ?state=all for every lock (operator)", {
                "200": _answer("A list")}, security=bearer)},
        "/locks/{id}": {"delete": _op("Remove a lock (operator)", {
            "200": _answer("The lock, removed")}, parameters=id_param, security=bearer)},
        "/tasks": {"get": _op("Tasks (operator)", {
            "200": _answer("A page", "#/components/schemas/TaskList")}, parameters=FILTERS, security=bearer)},
        "/audit": {"get": _op("Audit events (operator)", {
            "200": _answer("A page", "#/components/schemas/AuditList")},
            parameters=AUDIT_FILTERS,
            security=bearer)},
        "/healthz": {"get": _op("Liveness", {"200": _answer("Alive")})},
        "/readyz": {"get": _op("Database and Vault reachable, schema migrated", {"200": _answer("Ready")})},
        "/metrics": {"get": _op("Prometheus metrics", {"200": _answer("Text exposition")})},
    }  # fmt: skip
    schemas["TaskTypeList"] = CATALOGUE_SCHEMA
    schemas["TaskList"] = _list_of(task_ref)
    schemas["LeaseList"] = _list_of(lease_ref)
    schemas["AuditList"] = _list_of("#/components/schemas/AuditEvent")
    return {
        "openapi": "3.1.0",
        "info": {"title": "Credential Broker", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }
