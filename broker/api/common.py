"""What every handler needs: the services, the caller's identity, a strictly parsed body."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from decimal import Decimal
from typing import Any, TypeVar

from flask import current_app, request
from gunicorn.http.errors import ParseException
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import ClientDisconnected

from broker import logs
from broker.canonical import MAX_EXACT_INTEGER
from broker.errors import BodyTooLarge, Forbidden, MalformedBody, UnsupportedMediaType, ValidationFailed
from broker.identity import Identity, InvalidToken
from broker.identity.types import IdentityUse
from broker.services import Services

Model = TypeVar("Model", bound=BaseModel)

# What reading a body raises when its framing is broken: gunicorn's parser errors (a bad
# chunk size, a missing CRLF, a bad extension); a body cut short, which werkzeug's stream
# turns into ClientDisconnected; OSError from werkzeug's own decoder (its dev server).
UNREADABLE_BODY = (ParseException, ClientDisconnected, OSError)


def services() -> Services:
    found: Services = current_app.extensions["broker.services"]
    return found


def caller(*uses: IdentityUse) -> Identity:
    """Verify the bearer token and check that its issuer grants one of `uses` (docs/contract.md §3)."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidToken("missing bearer token")
    identity = services().verifier.verify(token.strip())
    logs.annotate(workload=identity.id)
    if not any(identity.may(use) for use in uses):
        raise Forbidden(f"this token may not act as {' or '.join(uses)}")
    return identity


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValidationFailed(f"duplicate keys in JSON body: {', '.join(duplicates)}")
    return dict(pairs)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class _Refused:
    """A value the API does not take, left where it was parsed so the error names its field."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why


_OUT_OF_RANGE = f"numbers must lie within ±{MAX_EXACT_INTEGER} (send larger ones as strings)"
_INEXACT = "has more digits than a 64-bit float holds (send it as a string)"
_MAX_INTEGER_DIGITS = len(str(MAX_EXACT_INTEGER))


# The numbers taken are those Postgres's jsonb and every JSON reader hold exactly as sent,
# so what is stored, hashed, shown to an approver and read back is one value (docs/api.md,
# "Numbers"). Refused numbers are marked, not raised: json.loads can't say where they were.
def _integer(text: str) -> int | _Refused:
    # The length first: int() of thousands of digits is slow, and refused anyway.
    if len(text.lstrip("-")) > _MAX_INTEGER_DIGITS or abs(int(text)) > MAX_EXACT_INTEGER:
        return _Refused(_OUT_OF_RANGE)
    return int(text)


def _fraction(text: str) -> float | _Refused:
    """A number with a fraction or exponent: a double, taken only if it is exactly the
    number written (up to trailing zeros), so 1E2 is 100.0 and 0.1 stays 0.1."""
    value = float(text)
    if not math.isfinite(value) or abs(value) > MAX_EXACT_INTEGER:
        return _Refused(_OUT_OF_RANGE)
    # repr is the shortest text that reads back as this double: another value than the
    # text's means digits were lost (3.14159265358979323846, 1e-400).
    if Decimal(repr(value)) != Decimal(text):
        return _Refused(_INEXACT)
    # jsonb has no negative zero; it would come back as 0.0.
    return value + 0.0


# json.loads pairs escaped surrogates into one character; any left is a lone half, which
# is not Unicode: Postgres refuses it in jsonb and UTF-8 can't encode it for a text column.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_NOT_UNICODE = "is not valid Unicode (a lone surrogate)"


def _surrogate(text: str) -> bool:
    return _LONE_SURROGATE.search(text) is not None


def _nodes(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every key and every leaf of a JSON value, in order, with the dotted path to it
    (a key comes before what it holds, so a bad key is reported before its value)."""
    items: Any
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        yield path or "body", value
        return
    for key, item in items:
        where = f"{path}.{key}" if path else str(key)
        if isinstance(key, str):
            yield where, key
        yield from _nodes(item, where)


def refused_at(value: Any) -> tuple[str, str] | None:
    """Where a refused number or a lone surrogate sits (keys included), and why."""
    for where, node in _nodes(value):
        if isinstance(node, _Refused):
            return where, node.why
        if isinstance(node, str) and _surrogate(node):
            # The path may hold the surrogate itself: shown escaped, never as broken text.
            return where.encode("utf-8", "backslashreplace").decode(), _NOT_UNICODE
    return None


_CONTROL = {chr(code) for code in range(32) if chr(code) not in "\t\n\r"} | {"\x7f"}


def unprintable_at(value: Any) -> str | None:
    """Where a NUL or other control character sits (keys included), if anywhere.

    Postgres can't store NUL, and control characters hide what an approver reads.
    """
    for where, node in _nodes(value):
        if isinstance(node, str) and not _CONTROL.isdisjoint(node):
            return where
    return None


def json_body(model: type[Model]) -> Model:
    """Parse the body as JSON into `model`, refusing unknown fields and duplicate keys."""
    mimetype = request.mimetype or ""
    # No Content-Type at all is read as JSON; a declared other type (a form, say) is refused.
    if mimetype and mimetype != "application/json" and not mimetype.endswith("+json"):
        raise UnsupportedMediaType("send the body as application/json")
    limit = services().settings.limits.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"the body may be at most {limit} bytes")
    # Read one byte past the limit: a chunked body has no Content-Length to check first.
    try:
        raw = request.stream.read(limit + 1)
    except UNREADABLE_BODY:
        # The framing is the client's fault, not ours: a 400, and no parser text (it quotes
        # the client's bytes). gunicorn closes the connection (broker.server).
        raise MalformedBody(
            "the body can't be read: its chunked encoding is malformed or cut short"
        ) from None
    if len(raw) > limit:
        raise BodyTooLarge(f"the body may be at most {limit} bytes")
    try:
        data = json.loads(
            raw,
            object_pairs_hook=_refuse_duplicate_keys,
            parse_constant=_refuse_constant,
            parse_float=_fraction,
            parse_int=_integer,
        )
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ValidationFailed("the body is not valid JSON") from None
    where = unprintable_at(data)
    if where:
        raise ValidationFailed(f"'{where}': must not contain NUL or control characters")
    refused = refused_at(data)
    if refused:
        where, why = refused
        raise ValidationFailed(f"'{where}': {why}")
    if not isinstance(data, dict):
        raise ValidationFailed("the body must be a JSON object")
    try:
        parsed = model.model_validate(data)
    except ValidationError as error:
        raise ValidationFailed(describe_validation(error), errors=_safe_errors(error)) from None
    task_id = getattr(parsed, "task_id", None)
    logs.annotate(task_id=str(task_id) if task_id else None)
    return parsed


def query_args(model: type[Model]) -> Model:
    repeated = next((key for key in request.args if len(request.args.getlist(key)) > 1), None)
    if repeated is not None:
        # Which one would count is a guess either way; `?state=a&state=b` is no "or".
        raise ValidationFailed(f"'{repeated}' is given more than once")
    data = {key: value for key, value in request.args.items()}
    where = unprintable_at(data)
    if where:
        raise ValidationFailed(f"'{where}': must not contain NUL or control characters")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ValidationFailed(describe_validation(error), errors=_safe_errors(error)) from None


def describe_validation(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    if first["type"] == "extra_forbidden":
        return f"unknown field '{where}'"
    if first["type"] == "missing":
        return f"'{where}' is required"
    return f"'{where}': {first['msg'].removeprefix('Value error, ')}"


def _safe_errors(error: ValidationError) -> list[dict[str, Any]]:
    # The input values are left out on purpose: they may be long or hostile.
    return [
        {"field": ".".join(str(p) for p in item["loc"]), "problem": item["type"]} for item in error.errors()
    ]
