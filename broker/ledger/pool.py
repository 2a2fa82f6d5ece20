"""Pooled task tokens (docs/contract.md §6.2): recorded under their holder's lease before
they are pooled, handed to a task in the task's own statements (`broker.ledger.tasks`),
and reclaimed by the scheduler once the holder stops renewing. Leases run on the
database's clock, the one the scheduler judges them by."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple

from sqlalchemy import Select, String, any_, bindparam, delete, func, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from broker.db import pipelined
from broker.ledger._sql import POOLED
from broker.models import PooledToken

RECORD_POOLED = (
    "INSERT INTO task_tokens (accessor, task, holder, expires_at, lease_until)"
    " VALUES (%(accessor)s, %(task)s, %(holder)s, %(expires_at)s,"
    " now() + make_interval(secs => %(lease_seconds)s))"
    " ON CONFLICT (accessor) DO UPDATE SET task = excluded.task, holder = excluded.holder,"
    " lease_until = excluded.lease_until"
)
_RENEW_POOLED = (
    "UPDATE task_tokens SET lease_until = now() + make_interval(secs => %(lease_seconds)s)"
    " WHERE holder = %(holder)s"
)
# What Vault expired has nothing left to revoke; its holder drops the row as it renews.
_DROP_EXPIRED = "DELETE FROM task_tokens WHERE holder = %(holder)s AND expires_at <= now()"
_FORGET_POOLED = "DELETE FROM task_tokens WHERE accessor = ANY(%(accessors)s)"
# A token its holder could not revoke: no longer held, so the scheduler's next claim takes it.
_ABANDON_POOLED = (
    "UPDATE task_tokens SET holder = '', lease_until = now() WHERE accessor = ANY(%(accessors)s)"
)
# The handover to a task: gone means the scheduler reclaimed (revoked) the token first.
TAKE_POOLED = "DELETE FROM task_tokens WHERE accessor = %(accessor)s RETURNING accessor"


class PoolRecord(NamedTuple):
    """A pooled token as its holder records it."""

    accessor: str
    task: str
    expires_at: datetime
    holder: str
    lease_seconds: float


def record_pooled(
    session: Session, *, holder: str, lease_seconds: float, tokens: Sequence[PoolRecord] = (),
    forget: Sequence[str] = (), abandon: Sequence[str] = (),
) -> None:  # fmt: skip
    """Record `tokens`, renew `holder`'s lease on every token it holds, drop the rows of
    `forget` (tokens it revoked) and of its tokens Vault has expired, and hand `abandon`
    (tokens it could not revoke) to the scheduler: one round trip."""
    params = {"holder": holder, "lease_seconds": lease_seconds}
    with pipelined(session) as connection:
        if tokens:
            connection.cursor().executemany(RECORD_POOLED, [token._asdict() for token in tokens])
        connection.execute(_RENEW_POOLED, params)
        connection.execute(_DROP_EXPIRED, params)
        if forget:
            connection.execute(_FORGET_POOLED, {"accessors": list(forget)})
        if abandon:  # after the renewal, which would renew them too
            connection.execute(_ABANDON_POOLED, {"accessors": list(abandon)})


def take_pooled(session: Session, accessor: str) -> bool:
    """`insert_task`'s handover for an ORM-loaded task (a claim); False if reclaimed."""
    taken = session.execute(
        delete(PooledToken).where(PooledToken.accessor == accessor).returning(PooledToken.accessor)
    )
    return taken.first() is not None


def lapsed_pooled(limit: int = 20) -> Select[str, str, bool]:
    """Pooled tokens whose holder stopped renewing its lease, the longest lapsed first
    (ix_task_tokens_lease_until); `expired`: Vault already dropped the token."""
    return (
        select(
            PooledToken.accessor, PooledToken.holder, (PooledToken.expires_at <= func.now()).label("expired")
        )
        .where(PooledToken.lease_until < func.now())
        .order_by(PooledToken.lease_until)
        .limit(limit)
    )


FORGET_POOLED = POOLED.delete().where(POOLED.c.accessor == any_(bindparam("accessors", type_=ARRAY(String))))
