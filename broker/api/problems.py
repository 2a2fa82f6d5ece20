"""Every error a caller can see, mapped to `application/problem+json` (RFC 9457) in one table.

Domain code raises typed errors (`broker.errors`, `identity.InvalidToken`,
`vault.VaultUnavailable`, `db.DatabaseUnavailable`); this module alone decides their status,
stable `code` and title. A `detail` comes from the error only where the error was written
for the caller (`BrokerError.detail`, `InvalidToken.detail`); every other class gets the
fixed sentence of its row, so no exception text, Vault response or secret value leaks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, json
from werkzeug.exceptions import HTTPException

from broker.db import DatabaseUnavailable
from broker.errors import (
    BodyTooLarge,
    BrokerError,
    Conflict,
    Forbidden,
    IdempotencyKeyReused,
    IssuanceFailed,
    LimitExceeded,
    Locked,
    MalformedBody,
    NotFound,
    PolicyDenied,
    TtlExceedsMax,
    UnknownTask,
    UnsupportedMediaType,
    ValidationFailed,
)
from broker.identity import InvalidToken, KeysUnavailable
from broker.vault import VaultUnavailable

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "https://credential-broker.dev/problems/"
# How long a client should wait before retrying while a dependency is down.
UNAVAILABLE_RETRY_AFTER = 5


@dataclass(frozen=True)
class Problem:
    status: int
    code: str
    title: str
    # The detail for errors that carry none written for the caller.
    detail: str | None = None


# The domain errors' rows: status and code here, the title from the class (`broker.errors`),
# so each title is written once.
_DOMAIN: tuple[tuple[type[BrokerError], int, str], ...] = (
    (ValidationFailed, 400, "validation_error"),
    (MalformedBody, 400, "bad_request"),
    (TtlExceedsMax, 400, "ttl_exceeds_max"),
    (Forbidden, 403, "forbidden"),
    (PolicyDenied, 403, "policy_denied"),
    (Locked, 403, "locked"),
    (NotFound, 404, "not_found"),
    (UnknownTask, 404, "unknown_task"),
    (Conflict, 409, "conflict"),
    (BodyTooLarge, 413, "body_too_large"),
    (UnsupportedMediaType, 415, "unsupported_media_type"),
    (IdempotencyKeyReused, 422, "idempotency_key_reused"),
    (LimitExceeded, 429, "limit_exceeded"),
    (IssuanceFailed, 502, "issuance_failed"),
)

PROBLEMS: dict[type[Exception], Problem] = {
    **{error: Problem(status, code, error.title) for error, status, code in _DOMAIN},
    # The other layers' errors carry no title of their own (they know nothing of HTTP).
    InvalidToken: Problem(401, "invalid_token", "The bearer token was not accepted"),
    VaultUnavailable: Problem(
        503,
        "vault_unavailable",
        "Vault is unavailable; nothing was issued",
        "Vault could not be reached; nothing was issued, try again shortly",
    ),
    DatabaseUnavailable: Problem(
        503,
        "database_unavailable",
        "The database is unavailable; nothing was issued",
        "the database could not be reached; try again shortly",
    ),
    # Fail closed, but say it is ours: the caller's token may be fine.
    KeysUnavailable: Problem(
        503,
        "identity_unavailable",
        "The token issuer's keys are unavailable",
        "the issuer's signing keys can't be fetched right now",
    ),
}

# Werkzeug's own refusals (no such route, a body over the limit) answer as the domain
# error that means the same, so a caller sees one code and title for one problem.
_HTTP_ROWS: dict[int, Problem] = {
    400: PROBLEMS[MalformedBody],
    404: PROBLEMS[NotFound],
    405: Problem(405, "method_not_allowed", "Method not allowed"),
    413: PROBLEMS[BodyTooLarge],
    415: PROBLEMS[UnsupportedMediaType],
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


def problem_of(error: Exception) -> Problem:
    """The row for `error`: its own class's, else the nearest base class's."""
    for cls in type(error).__mro__:
        if cls in PROBLEMS:
            return PROBLEMS[cls]
    raise LookupError(type(error).__name__)


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


def _headers(error: Exception, row: Problem) -> dict[str, str]:
    if isinstance(error, LimitExceeded):
        return {"Retry-After": str(error.retry_after)}
    if row.status == 503:
        return {"Retry-After": str(UNAVAILABLE_RETRY_AFTER)}
    if row.status == 401:
        # RFC 6750 §3: tell the client which scheme and why, without echoing the token.
        return {"WWW-Authenticate": 'Bearer realm="credential-broker", error="invalid_token"'}
    return {}


def _from_mapped(error: Exception) -> Response:
    row = problem_of(error)
    written = isinstance(error, BrokerError | InvalidToken) and not isinstance(error, KeysUnavailable)
    detail = getattr(error, "detail", None) if written else None
    extra = error.extra if isinstance(error, BrokerError) else {}
    return problem(
        row.status, row.code, row.title, detail or row.detail or row.title, _headers(error, row), **extra
    )


def _from_http(error: HTTPException) -> Response:
    status = error.code or 500
    known = _HTTP_ROWS.get(status)
    code, title = (known.code, known.title) if known else ("http_error", error.name)
    headers = {}
    if status == 405 and error.valid_methods:  # type: ignore[attr-defined]
        headers["Allow"] = ", ".join(error.valid_methods)  # type: ignore[attr-defined]
    return problem(status, code, title, error.description or title, headers)


def _from_unexpected(error: Exception) -> Response:
    # Logged with the traceback for operators; the caller sees a code and no text.
    log.exception("unhandled error", exc_info=error)
    return problem(500, "internal_error", "Internal error", "An unexpected error occurred")


def _database_down(_error: Exception) -> Response:
    return _from_mapped(DatabaseUnavailable())


def _bad_data(_error: Exception) -> Response:
    # Input the database refused as a value (a safety net behind request validation).
    return _from_mapped(ValidationFailed("a value in the request can't be stored or compared"))


def _schema_or_unexpected(error: Exception) -> Response:
    # A table or column this build expects is missing: the schema is behind (broker
    # migrate never ran, or ran for an older build). Unavailable, with the fix, not a 500.
    import psycopg

    if isinstance(
        getattr(error, "orig", None), psycopg.errors.UndefinedTable | psycopg.errors.UndefinedColumn
    ):
        log.error("the database schema is behind this build: run `broker migrate`")
        row = PROBLEMS[DatabaseUnavailable]
        return problem(
            row.status,
            row.code,
            row.title,
            "the database schema is not migrated; an operator must run broker migrate",
            _headers(error, row),
        )
    return _from_unexpected(error)


def register_error_handlers(app: Flask) -> None:
    from sqlalchemy.exc import DataError, OperationalError, ProgrammingError

    for cls in PROBLEMS:
        app.register_error_handler(cls, _from_mapped)
    # The ORM's own failures: a lost connection, a refused value, a schema behind the build.
    app.register_error_handler(OperationalError, _database_down)
    app.register_error_handler(DataError, _bad_data)
    app.register_error_handler(ProgrammingError, _schema_or_unexpected)
    app.register_error_handler(HTTPException, _from_http)
    app.register_error_handler(Exception, _from_unexpected)
