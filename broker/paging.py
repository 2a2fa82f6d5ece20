"""Keyset paging shared by the operator lists: stable under inserts, no OFFSET scans."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute

from broker.errors import ValidationFailed

MAX_LIMIT = 500
DEFAULT_LIMIT = 100
Row = TypeVar("Row")


@dataclass(frozen=True)
class Page(Generic[Row]):
    items: Sequence[Row]
    next_cursor: str | None


def encode_cursor(at: datetime, key: Any) -> str:
    return base64.urlsafe_b64encode(f"{at.isoformat()}|{key}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        at, _, key = base64.urlsafe_b64decode(padded.encode()).decode().partition("|")
        return datetime.fromisoformat(at), key
    except (ValueError, UnicodeDecodeError):
        raise ValidationFailed("'cursor' is not a cursor this API gave out") from None


def decode_position(cursor: str, key_type: type = uuid.UUID) -> tuple[datetime, Any]:
    """The (time, key) a cursor holds, the key as `key_type`."""
    at, raw_key = decode_cursor(cursor)
    try:
        return at, key_type(raw_key)
    except ValueError:
        raise ValidationFailed("'cursor' is not a cursor this API gave out") from None


def clamp_limit(limit: int | None) -> int:
    if limit is None:
        return DEFAULT_LIMIT
    return max(1, min(MAX_LIMIT, limit))


def page(
    query: Select[Any],
    at_column: InstrumentedAttribute[Any],
    key_column: InstrumentedAttribute[Any],
    cursor: str | None,
    limit: int,
    *,
    key_type: type = uuid.UUID,
) -> Select[Any]:
    """Newest first; the cursor is the (time, key) of the last row of the previous page."""
    if cursor:
        at, key = decode_position(cursor, key_type)
        query = query.where(or_(at_column < at, and_(at_column == at, key_column < key)))
    return query.order_by(at_column.desc(), key_column.desc()).limit(limit + 1)
