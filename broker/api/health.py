"""Liveness, readiness, metrics and the API document: open to anyone, no secrets."""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, jsonify
from flask.blueprints import BlueprintSetupState
from sqlalchemy.exc import SQLAlchemyError

from broker import metrics
from broker.api.common import services
from broker.api.problems import problem
from broker.migrate import SchemaState, schema_state, schema_state_of, shipped_revisions
from broker.services import Services
from broker.vault import VaultError

log = logging.getLogger(__name__)
bp = Blueprint("health", __name__)
# The schema's state while the database can't be reached (a failure named on its own).
UNKNOWN = "unknown"
# A schema a newer build migrated keeps the replica in service: see SchemaState.AHEAD.
PASSING = frozenset({"ok", SchemaState.AHEAD, UNKNOWN})


@bp.record_once
def _report_schema_at_start(state: BlueprintSetupState) -> None:
    # Against a database `broker migrate` never ran on, the process would start and then
    # fail every request and sweep with UndefinedTable; say it once, with the fix.
    built: Services = state.app.extensions["broker.services"]
    try:
        shipped = shipped_revisions()
        schema = schema_state_of(built.engine)
    except Exception:  # a warning at start must never keep a worker from booting
        log.warning("could not compare the database schema with this build's migrations", exc_info=True)
        return
    heads = ", ".join(sorted(shipped.heads))
    if schema is SchemaState.BEHIND:
        log.error(
            "the database schema is behind this build (head %s): run `broker migrate`;"
            " until then /readyz answers 503 and requests fail",
            heads,
        )
    elif schema is SchemaState.AHEAD:
        log.warning(
            "the database schema is newer than this build (head %s): a newer build migrated it",
            heads,
        )


@bp.get("/healthz")
def healthz() -> Any:
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> Any:
    database, schema = _check_database()
    checks = {"database": database, "schema": schema, "vault": _check_vault()}
    failed = [f"{name} {state}" for name, state in checks.items() if state not in PASSING]
    if failed:
        return problem(
            503,
            "not_ready",
            "Not ready",
            f"not ready: {', '.join(failed)}",
            {"Retry-After": "5"},
            checks=checks,
        )
    return jsonify(status="ready", checks=checks)


@bp.get("/metrics")
def prometheus() -> Response:
    body, content_type = metrics.render()
    return Response(body, content_type=content_type)


@bp.get("/openapi.json")
def openapi() -> Any:
    from broker.api.openapi import document

    return jsonify(document())


def _check_database() -> tuple[str, str]:
    """The database's state and its schema's, from one query."""
    try:
        with services().engine.connect() as connection:
            schema = schema_state(connection)
    except SQLAlchemyError:
        return "unavailable", UNKNOWN
    return "ok", schema


def _check_vault() -> str:
    try:
        services().vault.health()
    except VaultError:
        return "unavailable"
    return "ok"
