"""Liveness, readiness, metrics and the API document: open to anyone, no secrets."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify
from sqlalchemy import text

from broker import metrics
from broker.api.common import services
from broker.errors import problem
from broker.vault import VaultError

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Any:
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> Any:
    checks = {"database": _check_database(), "vault": _check_vault()}
    failed = [name for name, state in checks.items() if state != "ok"]
    if failed:
        return problem(
            503,
            "not_ready",
            "Not ready",
            f"unavailable: {', '.join(failed)}",
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


def _check_database() -> str:
    try:
        with services().engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception:
        return "unavailable"
    return "ok"


def _check_vault() -> str:
    try:
        services().vault.health()
    except VaultError:
        return "unavailable"
    return "ok"
