"""Typed errors and their one mapping to `application/problem+json` (RFC 9457).

Every failure a caller can see has a stable `code`; the `detail` is written for the
caller and never carries exception text, Vault responses or secret values.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from flask import Flask, Response, json
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "https://credential-broker.dev/problems/"


class BrokerError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.extra = extra

    def headers(self) -> dict[str, str]:
        return {}


class ValidationFailed(BrokerError):
    status, code, title = 400, "validation_error", "The request is not valid"


class TtlExceedsMax(BrokerError):
    status, code, title = 400, "ttl_exceeds_max", "The requested TTL exceeds the task's maximum"


class InvalidTokenError(BrokerError):
    status, code, title = 401, "invalid_token", "The bearer token was not accepted"

    def headers(self) -> dict[str, str]:
        # RFC 6750 §3: tell the client which scheme and why, without echoing the token.
        return {"WWW-Authenticate": 'Bearer realm="credential-broker", error="invalid_token"'}


class Forbidden(BrokerError):
    status, code, title = 403, "forbidden", "This identity may not do that"


class PolicyDenied(BrokerError):
    status, code, title = 403, "policy_denied", "The policy denied this request"


class NotFound(BrokerError):
    status, code, title = 404, "not_found", "Not found"


class UnknownTask(BrokerError):
    status, code, title = 404, "unknown_task", "No such task type in the policy"


class Conflict(BrokerError):
    status, code, title = 409, "conflict", "The request conflicts with the current state"


class BodyTooLarge(BrokerError):
    status, code, title = 413, "body_too_large", "The request body is too large"


class UnsupportedMediaType(BrokerError):
    status, code, title = 415, "unsupported_media_type", "Send application/json"


class LimitExceeded(BrokerError):
    status, code, title = 429, "limit_exceeded", "A policy limit was reached"

    def __init__(self, detail: str | None = None, *, retry_after: int = 1, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.retry_after = max(1, retry_after)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class ServiceUnavailable(BrokerError):
    status = 503
    retry_after: ClassVar[int] = 5

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class VaultUnavailableError(ServiceUnavailable):
    code, title = "vault_unavailable", "Vault is unavailable; nothing was issued"


class DatabaseUnavailableError(ServiceUnavailable):
    code, title = "database_unavailable", "The database is unavailable; nothing was issued"


class IdentityUnavailable(ServiceUnavailable):
    code, title = "identity_unavailable", "The token issuer's keys are unavailable"


class IssuanceFailed(BrokerError):
    status, code, title = 502, "issuance_failed", "Vault refused to issue a credential"


_HTTP_CODES = {
    400: ("bad_request", "Bad request"),
    404: ("not_found", "Not found"),
    405: ("method_not_allowed", "Method not allowed"),
    413: ("body_too_large", "The request body is too large"),
    415: ("unsupported_media_type", "Send application/json"),
}
# What gunicorn refuses before the app sees a request (a malformed request line or header,
# a URI or headers over its limits), answered in the same shape instead of its HTML page.
_SERVER_REFUSALS = {
    400: ("bad_request", "Bad request", "the request is not valid HTTP/1.1"),
    403: ("forbidden", "Forbidden", "the request was refused"),
    414: ("uri_too_long", "URI too long", "the request line is longer than the server accepts"),
    417: ("expectation_failed", "Expectation failed", "only 'Expect: 100-continue' is supported"),
    431: (
        "headers_too_large",
        "Request headers too large",
        "a header, or all of them, exceed the server's limits",
    ),
    501: ("not_implemented", "Not implemented", "that transfer coding is not supported"),
}


def server_refusal(status: int) -> bytes:
    """A whole HTTP/1.1 answer, problem+json, for a request the HTTP server refused itself.
    The detail is a fixed sentence: gunicorn's message quotes the client's bytes."""
    code, title, detail = _SERVER_REFUSALS.get(
        status, ("internal_error", "Internal error", "an unexpected error occurred")
    )
    body = json.dumps(_problem_body(status, code, title, detail))
    head = (
        f"HTTP/1.1 {status} {title}\r\nConnection: close\r\nContent-Type: {PROBLEM_JSON}\r\n"
        f"Content-Length: {len(body.encode())}\r\n\r\n"
    )
    return head.encode("latin-1") + body.encode()


def _problem_body(status: int, code: str, title: str, detail: str) -> dict[str, Any]:
    return {"type": PROBLEM_BASE + code, "title": title, "status": status, "detail": detail, "code": code}


def problem(
    status: int, code: str, title: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> Response:
    body = _problem_body(status, code, title, detail)
    body.update({k: v for k, v in extra.items() if k not in body})
    response = Response(json.dumps(body), status=status, mimetype=PROBLEM_JSON)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _from_broker(error: BrokerError) -> Response:
    return problem(error.status, error.code, error.title, error.detail, error.headers(), **error.extra)


def _from_http(error: HTTPException) -> Response:
    status = error.code or 500
    code, title = _HTTP_CODES.get(status, ("http_error", error.name))
    headers = {}
    if status == 405 and error.valid_methods:  # type: ignore[attr-defined]
        headers["Allow"] = ", ".join(error.valid_methods)  # type: ignore[attr-defined]
    return problem(status, code, title, error.description or title, headers)


def _from_unexpected(error: Exception) -> Response:
    # Logged with the traceback for operators; the caller sees a code and no text.
    log.exception("unhandled error", exc_info=error)
    return problem(500, "internal_error", "Internal error", "An unexpected error occurred")


def _database_down(_error: Exception) -> Response:
    return _from_broker(DatabaseUnavailableError("the database could not be reached; try again shortly"))


def _bad_data(_error: Exception) -> Response:
    # Input the database refused as a value (a safety net behind request validation).
    return _from_broker(ValidationFailed("a value in the request can't be stored or compared"))


def _schema_or_unexpected(error: Exception) -> Response:
    # A table or column this build expects is missing: the schema is behind (broker
    # migrate never ran, or ran for an older build). Unavailable, with the fix, not a 500.
    import psycopg

    if isinstance(
        getattr(error, "orig", None), psycopg.errors.UndefinedTable | psycopg.errors.UndefinedColumn
    ):
        log.error("the database schema is behind this build: run `broker migrate`")
        return _from_broker(
            DatabaseUnavailableError(
                "the database schema is not migrated; an operator must run broker migrate"
            )
        )
    return _from_unexpected(error)


def _vault_down(_error: Exception) -> Response:
    return _from_broker(VaultUnavailableError("Vault could not be reached; try again shortly"))


def register_error_handlers(app: Flask) -> None:
    from sqlalchemy.exc import DataError, OperationalError, ProgrammingError

    from broker.db import DatabaseUnavailable
    from broker.vault import VaultUnavailable

    app.register_error_handler(BrokerError, _from_broker)
    app.register_error_handler(DatabaseUnavailable, _database_down)
    app.register_error_handler(OperationalError, _database_down)
    app.register_error_handler(VaultUnavailable, _vault_down)
    app.register_error_handler(DataError, _bad_data)
    app.register_error_handler(ProgrammingError, _schema_or_unexpected)
    app.register_error_handler(HTTPException, _from_http)
    app.register_error_handler(Exception, _from_unexpected)
