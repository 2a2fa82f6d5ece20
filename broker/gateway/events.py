"""The gateway's audit events, written in batches.

A busy session runs many statements a second; one transaction per statement would make
the ledger's Postgres the gateway's bottleneck. Events are queued in memory and written
together, in one transaction, every `audit_flush_seconds` (or sooner, once `BATCH` are
waiting), into the same tamper-evident chain as every other event. What a gateway that
dies holds unwritten is at most that interval's events (docs/gateway.md, "What is lost if
a gateway dies"). The queue is bounded: when the ledger can't take events for long enough
to fill it, `queue_event` says so and the gateway refuses statements instead of running them
unrecorded.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from broker.audit import record
from broker.clock import Clock
from broker.db import unit_of_work

log = logging.getLogger(__name__)

# Events written per transaction at most; a full batch is written without waiting.
BATCH = 500
# Events held while the ledger is away, at most: about a minute of a very busy gateway.
BACKLOG = 50_000


@dataclass(frozen=True)
class GatewayEvent:
    event: str
    actor: str
    at: datetime
    task_id: uuid.UUID | None
    owner: str | None
    purpose: str | None
    detail: Mapping[str, Any]


class AuditBatch:
    """Thread-safe; `start` runs the writer thread, `close` writes what is left."""

    def __init__(self, sessions: sessionmaker[Session], clock: Clock, flush_seconds: float) -> None:
        self._sessions = sessions
        self._clock = clock
        self._flush_seconds = flush_seconds
        self._queue: deque[GatewayEvent] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def queue_event(
        self,
        event: str,
        actor: str,
        *,
        task_id: uuid.UUID | None = None,
        owner: str | None = None,
        purpose: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> bool:
        """Queue an event; False when the backlog is full (the ledger has been away)."""
        item = GatewayEvent(event, actor, self._clock.now(), task_id, owner, purpose, dict(detail or {}))
        with self._lock:
            if len(self._queue) >= BACKLOG:
                return False
            self._queue.append(item)
            full = len(self._queue) >= BATCH
        if full:
            self._wake.set()
        return True

    def has_room(self) -> bool:
        """Whether an event queued now would be taken: the Vault API asks before it relays a
        request, whose event (with Vault's status) is queued only after the answer."""
        with self._lock:
            return len(self._queue) < BACKLOG

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gateway-audit", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()

    def flush(self) -> int:
        """Write what is queued, a batch per transaction; on failure keep it for the next try."""
        written = 0
        while True:
            with self._lock:
                batch = [self._queue[i] for i in range(min(BATCH, len(self._queue)))]
            if not batch:
                return written
            try:
                with unit_of_work(self._sessions) as session:
                    for item in batch:
                        record(
                            session, self._clock, item.event, item.actor, task_id=item.task_id,
                            owner=item.owner, purpose=item.purpose, detail=item.detail, at=item.at,
                        )  # fmt: skip
            except Exception:
                log.warning("could not write %d gateway audit events; retrying", len(batch))
                return written
            with self._lock:
                for _ in batch:
                    self._queue.popleft()
            written += len(batch)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._flush_seconds)
            self._wake.clear()
            self.flush()
