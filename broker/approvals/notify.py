"""Webhook notifications (config `notify`): approvers learn that a task waits for them.

Sent from a background thread with a bounded queue, so a slow or dead webhook never
slows a request; a full queue drops (and logs) rather than blocking. Each body is signed
with HMAC-SHA256 over the raw bytes when a secret is configured, so the receiver can
check that the broker sent it. Bodies carry who/what/why, never a secret value.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import queue
import threading
from collections.abc import Mapping
from typing import Any

import requests

from broker.config import NotifySettings

log = logging.getLogger(__name__)
SIGNATURE_HEADER = "X-Broker-Signature"


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class Notifier:
    def __init__(self, settings: NotifySettings | None, *, capacity: int = 1000) -> None:
        self._settings = settings
        self._secret = (
            os.environ.get(settings.secret_env, "").encode() if settings and settings.secret_env else b""
        )
        self._queue: queue.Queue[bytes] = queue.Queue(maxsize=capacity)
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()

    def send(self, event: str, payload: Mapping[str, Any]) -> None:
        if self._settings is None:
            return
        body = json.dumps({"event": event, **payload}, default=str, sort_keys=True).encode()
        try:
            self._queue.put_nowait(body)
        except queue.Full:
            log.warning("notification queue full; dropped %s", event)
            return
        self._ensure_worker()

    def _ensure_worker(self) -> None:
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="notify", daemon=True)
                self._worker.start()

    def _run(self) -> None:
        assert self._settings is not None
        session = requests.Session()
        while True:
            body = self._queue.get()
            headers = {"Content-Type": "application/json"}
            if self._secret:
                headers[SIGNATURE_HEADER] = sign(self._secret, body)
            try:
                response = session.post(
                    self._settings.webhook_url,
                    data=body,
                    headers=headers,
                    timeout=self._settings.timeout_seconds,
                    allow_redirects=False,
                )
                if response.status_code >= 300:
                    log.warning("webhook answered HTTP %s", response.status_code)
            except requests.RequestException as error:
                log.warning("webhook failed: %s", type(error).__name__)
            finally:
                self._queue.task_done()

    def drain(self, timeout: float = 5.0) -> None:
        """Wait until queued notifications were sent (tests, shutdown)."""
        done = threading.Event()

        def wait_for_queue() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait_for_queue, daemon=True).start()
        done.wait(timeout)
