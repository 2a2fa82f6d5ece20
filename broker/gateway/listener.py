"""Hearing of task ends: LISTEN on a connection of its own, and a recheck besides.

The `tasks_ended` trigger NOTIFYs `broker_task_ended` with a task's id when a task with
handles ends, on every path and in every replica (migration 0007). A notification is
delivered only to connections listening when the ending transaction commits: one that
reconnects has missed what came in between. So the gateway also rechecks the tasks it
serves every `recheck_seconds` (and at once after a reconnect), and closes sessions at
their task's deadline by its own clock, which needs no database at all.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

import psycopg

log = logging.getLogger(__name__)

CHANNEL = "broker_task_ended"
_RECONNECT_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)


class TaskEndListener:
    """A thread that calls `ended(task_id)` for each notification, and `reconnected()` after
    every (re)connection, when notifications may have been missed."""

    def __init__(self, dsn: str, ended: Callable[[uuid.UUID], None], reconnected: Callable[[], None]) -> None:
        self._dsn = dsn
        self._ended = ended
        self._reconnected = reconnected
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gateway-listen", daemon=True)
        self._connection: psycopg.Connection[tuple[object, ...]] | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._dsn, autocommit=True, connect_timeout=5) as connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    failures = 0
                    self._reconnected()
                    while not self._stop.is_set():
                        for notice in connection.notifies(timeout=0.5):
                            self._deliver(notice.payload)
            except psycopg.Error:
                delay = _RECONNECT_SECONDS[min(failures, len(_RECONNECT_SECONDS) - 1)]
                failures += 1
                log.warning("gateway: lost the task-end notifications; reconnecting in %.1f s", delay)
                time.sleep(delay)

    def _deliver(self, payload: str) -> None:
        try:
            task_id = uuid.UUID(payload)
        except ValueError:
            log.warning("gateway: ignored a %s notification that names no task", CHANNEL)
            return
        self._ended(task_id)
