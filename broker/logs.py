"""Logging: text for people at a terminal, JSON (one object a line) for collectors.

`log_format: json` makes every line an object with `time`, `level`, `logger`, `message` and,
inside a request, `request_id`, `method`, `route`, `status`, `task_id` and `workload`, so a
collector can join a request's lines without parsing prose. Messages never carry secret
values: the code logs identifiers, states and error classes, never bodies or credentials.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import sys
from typing import Any

from pythonjsonlogger.json import JsonFormatter

REQUEST_ID_HEADER = "X-Request-Id"
# What a caller's own id may look like: enough for a UUID, a trace id or a ULID; anything
# else (long, spaced, control characters) is replaced, so it can't forge or split a line.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_FIELDS = ("request_id", "method", "route", "status", "task_id", "workload")

_request: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "broker_request", default=None
)

# Libraries that speak at INFO about routine work: APScheduler two lines per job run (about
# ten a second at the default sweep), Alembic one per plugin whenever its scripts are read.
# Their warnings and errors still show; `log_level: DEBUG` shows everything.
_CHATTY = ("apscheduler", "alembic.runtime.plugins")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def request_id_from(header: str | None) -> str:
    """The caller's id when it is a plain token, a fresh one otherwise."""
    if header and _REQUEST_ID.fullmatch(header):
        return header
    return os.urandom(16).hex()  # as random as uuid4().hex, without building a UUID


def begin_request(**fields: Any) -> None:
    _request.set(fields)  # a fresh dict already: `**fields` built it


def current_request() -> dict[str, Any]:
    """This request's fields, to read or add to in place (an empty dict outside a request)."""
    return _request.get() or {}


def annotate(**fields: Any) -> None:
    """Add what a handler learned (the workload, the task) to this request's log lines."""
    current = _request.get()
    if current is not None:
        for key, value in fields.items():
            if value is not None:
                current[key] = value


def end_request() -> None:
    _request.set(None)


class _RequestFields(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        current = _request.get() or {}
        for name in _FIELDS:
            if name in current and not hasattr(record, name):
                setattr(record, name, current[name])
        return True


def configure(level: str, fmt: str, *, force: bool = False) -> None:
    """Route every logger to stderr in `fmt` ("text" or "json") at `level`.

    Like `logging.basicConfig`, a root logger that already has handlers (an embedding
    program's, a test runner's) is left as it is unless `force`.
    """
    root = logging.getLogger()
    root.setLevel(level)
    if level != "DEBUG":
        for name in _CHATTY:
            logging.getLogger(name).setLevel(logging.WARNING)
    if root.handlers and not force:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestFields())
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                datefmt="%Y-%m-%dT%H:%M:%S%z",
                json_ensure_ascii=False,
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
