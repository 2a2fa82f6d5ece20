"""Tasks attached to the caller's session, for the rarer edits (approval, claim, operator
revocation, the kill switch): the unit of work's flush writes every field they change;
and the database's clock, which those edits measure windows with."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session, joinedload, lazyload, selectinload

from broker.models import Task


def load_task(session: Session, task_id: uuid.UUID, *, lock: bool = False) -> Task | None:
    """A task with its leases in one round trip (and its approvals only if it has any).

    The hot paths (start, finish, expiry) read tasks that never needed approval; loading
    their (empty) approvals would be a wasted query each time.
    """
    # Locked: the leases are read by a second statement once the lock is held. Joined into
    # the locking statement they would be the rows as they were *before* waiting for the
    # lock, and a finish would revoke again what an operator had just revoked.
    leases = selectinload(Task.leases) if lock else joinedload(Task.leases)
    query = (
        select(Task)
        .where(Task.id == task_id)
        .options(leases, lazyload(Task.approvals))
        .execution_options(populate_existing=True)
    )
    if lock:
        query = query.with_for_update(of=Task)
    task = session.scalars(query).unique().first()
    if task is not None and task.approval_expires_at is not None:
        task.approvals  # noqa: B018 (load while attached: rendered after the session closes)
    return task


def database_now(session: Session) -> datetime:
    """The database's clock, so every replica measures deadlines against one time."""
    now: datetime | None = session.scalar(select(func.now()))
    assert now is not None  # now() always answers
    return now
