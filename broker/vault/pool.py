"""A small per-process pool of ready task tokens, so a start doesn't wait for Vault to mint one.

A task token is created through the task token role with the task type's policies and a
TTL of the type's *maximum* TTL (SPEC §6.4: Vault's TTLs never exceed the task's maximum).
A start takes one whose remaining life covers its own TTL, records its accessor with the
task in the same transaction as the decision, and the pool refills in the background.
A token still in the pool was never used for anything; if the process dies, it simply
expires. Tokens that aged past usefulness are revoked as they are found.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Mapping
from datetime import timedelta

from broker.clock import Clock, SystemClock
from broker.credentials import CredentialSpec
from broker.vault.errors import VaultError
from broker.vault.gateway import TaskToken, VaultGateway
from broker.vault.policies import task_token_policies

log = logging.getLogger(__name__)

PoolKey = tuple[str, tuple[str, ...], int]


class TaskTokenPool:
    def __init__(
        self, vault: VaultGateway, clock: Clock | None = None, *, depth: int = 2, margin_seconds: int = 5
    ) -> None:
        self._vault = vault
        self._clock = clock or SystemClock()
        self._depth = depth
        self._margin = timedelta(seconds=margin_seconds)
        self._ready: dict[PoolKey, deque[TaskToken]] = {}
        self._lock = threading.Lock()
        self._wanted: queue.Queue[PoolKey | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._closed = False

    def take(
        self, *, task: str, specs: Mapping[str, CredentialSpec], ttl_max: int, ttl_needed: int
    ) -> TaskToken:
        """A token for one task of type `task` that lives at least `ttl_needed` seconds."""
        policies = tuple(task_token_policies(self._vault.sync_task_policy(task, specs), specs))
        key: PoolKey = (task, policies, ttl_max)
        token = self._pop_fresh(key, ttl_needed)
        if self._depth and not self._closed:
            self._ask_refill(key)
        if token is not None:
            return token
        return self._mint(key)

    def _pop_fresh(self, key: PoolKey, ttl_needed: int) -> TaskToken | None:
        deadline = self._clock.now() + timedelta(seconds=ttl_needed) + self._margin
        stale = []
        with self._lock:
            ready = self._ready.setdefault(key, deque())
            while ready:
                token = ready.popleft()
                if token.expires_at >= deadline:
                    break
                stale.append(token)
            else:
                token = None
        for old in stale:
            self._revoke_quietly(old)
        return token

    def _mint(self, key: PoolKey) -> TaskToken:
        task, policies, ttl_max = key
        return self._vault.create_task_token(
            task_id="pooled",
            task=task,
            policies=list(policies),
            ttl_seconds=ttl_max,
            meta={"task": task, "issued_by": "credential-broker"},
        )

    def _ask_refill(self, key: PoolKey) -> None:
        self._wanted.put(key)
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._refill_forever, name="token-pool", daemon=True)
                self._worker.start()

    def _refill_forever(self) -> None:
        while True:
            key = self._wanted.get()
            if key is None:
                return
            try:
                self._refill(key)
            except VaultError as error:
                log.warning("task token pool refill failed: %s", error)

    def _refill(self, key: PoolKey) -> None:
        while True:
            with self._lock:
                if self._closed or len(self._ready.setdefault(key, deque())) >= self._depth:
                    return
            token = self._mint(key)
            with self._lock:
                if not self._closed:
                    self._ready.setdefault(key, deque()).append(token)
                    continue
            self._revoke_quietly(token)  # minted while the pool was closing
            return

    def _revoke_quietly(self, token: TaskToken) -> None:
        try:
            self._vault.revoke_task_token(token.accessor)
        except VaultError as error:
            log.info("could not revoke an aged pooled token (it expires anyway): %s", error)

    def close(self) -> None:
        """Stop refilling and revoke what is still pooled (best effort)."""
        self._wanted.put(None)
        with self._lock:
            self._closed = True
            pooled = [token for ready in self._ready.values() for token in ready]
            self._ready.clear()
        for token in pooled:
            self._revoke_quietly(token)
