"""A small per-process pool of ready task tokens, so a start doesn't wait for Vault to mint one.

A task token is created through the task token role with the task type's policies and a
TTL of the type's *maximum* TTL (docs/contract.md §6.4: Vault's TTLs never exceed the task's maximum).
A start takes one whose remaining life covers its own TTL, records its accessor with the
task in the same transaction as the decision, and the pool refills in the background.
A token still in the pool has nothing alive under it: it was never used, or (with `reuse`)
its last task was finished through this process and every lease that task had was revoked
before the finish committed `token_released_at`. A token is lent to one task at a time
(`lend` when the start commits, `give_back_used` after the finish commits), so revoking it
for one task can never touch another's credentials. If the process dies, pooled tokens
simply expire. Tokens that aged past usefulness are revoked as they are found.
"""

from __future__ import annotations

import heapq
import json
import logging
import queue
import threading
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from broker.clock import Clock, SystemClock
from broker.credentials import CredentialSpec
from broker.vault.errors import VaultError
from broker.vault.gateway import VaultGateway
from broker.vault.policies import task_token_policies
from broker.vault.types import TaskToken

log = logging.getLogger(__name__)

PoolKey = tuple[str, str, int]
# Ready tokens kept per task type, as a multiple of the pool's depth, when finishes hand
# back more than starts take; beyond that a returned token is revoked.
_MAX_READY_FACTOR = 4


def _key(task: str, specs: Mapping[str, CredentialSpec], ttl_max: int) -> PoolKey:
    """Tokens are interchangeable within a task type, its credentials and its maximum TTL."""
    shape = json.dumps({name: spec.model_dump(mode="json") for name, spec in specs.items()}, sort_keys=True)
    return task, shape, ttl_max


@dataclass(frozen=True)
class _Lent:
    token: TaskToken
    key: PoolKey
    until: datetime


class TaskTokenPool:
    def __init__(
        self,
        vault: VaultGateway,
        clock: Clock | None = None,
        *,
        depth: int = 2,
        margin_seconds: int = 5,
        reuse: bool = False,
    ) -> None:
        self._vault = vault
        self._clock = clock or SystemClock()
        self._depth = depth
        self._margin = timedelta(seconds=margin_seconds)
        self._reuse = reuse
        self._ready: dict[PoolKey, deque[TaskToken]] = {}
        # Tokens of tasks this process started and that are still running, by task id,
        # with a heap of their deadlines so the ones that ended elsewhere are forgotten.
        self._lent: dict[uuid.UUID, _Lent] = {}
        self._lent_deadlines: list[tuple[datetime, uuid.UUID]] = []
        self._lock = threading.Lock()
        self._wanted: queue.Queue[tuple[PoolKey, Mapping[str, CredentialSpec]] | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._closed = False

    def take(
        self, *, task: str, specs: Mapping[str, CredentialSpec], ttl_max: int, ttl_needed: int
    ) -> TaskToken:
        """A token for one task of type `task` that lives at least `ttl_needed` seconds."""
        token = self.take_ready(task=task, specs=specs, ttl_max=ttl_max, ttl_needed=ttl_needed)
        if token is not None:
            return token
        key = _key(task, specs, ttl_max)
        token = self._mint(key, specs)
        self._refill_behind(key, specs)
        return token

    def take_ready(
        self, *, task: str, specs: Mapping[str, CredentialSpec], ttl_max: int, ttl_needed: int
    ) -> TaskToken | None:
        """A pooled token if one is ready, without calling Vault (a refill starts behind it).

        With none ready nothing is asked of Vault here: the caller checks the database
        first and then mints through `take`, which starts the refill. A start refused
        for a down database must leave Vault untouched (docs/security.md, "Fail closed").
        """
        key = _key(task, specs, ttl_max)
        token = self._pop_fresh(key, ttl_needed)
        if token is not None:
            self._refill_behind(key, specs)
        return token

    def _refill_behind(self, key: PoolKey, specs: Mapping[str, CredentialSpec]) -> None:
        # With reuse the pool mostly stays full; waking the refill thread to find that
        # out would cost every start a thread switch.
        if self._depth and not self._closed and len(self._ready.get(key, ())) < self._depth:
            self._ask_refill(key, specs)

    def give_back(
        self, token: TaskToken, *, task: str, specs: Mapping[str, CredentialSpec], ttl_max: int
    ) -> None:
        """Return a token taken for a start that ended up issuing nothing (denied, pending)."""
        with self._lock:
            if not self._closed:
                self._ready.setdefault(_key(task, specs, ttl_max), deque()).appendleft(token)
                return
        self._revoke_quietly(token)

    # -- reuse: a token whose task ended here with nothing left alive under it -------------

    def lend(
        self,
        task_id: uuid.UUID,
        token: TaskToken,
        *,
        task: str,
        specs: Mapping[str, CredentialSpec],
        ttl_max: int,
        until: datetime,
    ) -> None:
        """Remember the token of a task started here, so its finish here can `give_back_used`.

        Forgotten at `until` (the task's deadline): a task that ended elsewhere (expired,
        killed, finished through another worker) has its token retired by the scheduler.
        """
        if not self._reuse:
            return
        now = self._clock.now()
        with self._lock:
            while self._lent_deadlines and self._lent_deadlines[0][0] <= now:
                _, old = heapq.heappop(self._lent_deadlines)
                lent = self._lent.get(old)
                if lent is not None and lent.until <= now:
                    del self._lent[old]
            self._lent[task_id] = _Lent(token, _key(task, specs, ttl_max), until)
            heapq.heappush(self._lent_deadlines, (until, task_id))

    def holds(self, task_id: uuid.UUID, accessor: str) -> bool:
        """Whether this process lent `task_id` the token with this accessor."""
        lent = self._lent.get(task_id)
        return lent is not None and lent.token.accessor == accessor

    def give_back_used(self, task_id: uuid.UUID) -> None:
        """Pool the token of a task that ended here with every lease revoked.

        The caller has committed the task's `token_released_at` first, so the scheduler
        will not retire the token under the next task that takes it.
        """
        with self._lock:
            lent = self._lent.pop(task_id, None)
            if lent is None or self._closed:
                return
            ready = self._ready.setdefault(lent.key, deque())
            if len(ready) < max(self._depth, 1) * _MAX_READY_FACTOR:
                ready.appendleft(lent.token)
                return
        self._revoke_quietly(lent.token)  # more ready than starts want: no need to keep it

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

    def _mint(self, key: PoolKey, specs: Mapping[str, CredentialSpec]) -> TaskToken:
        task, _, ttl_max = key
        policies = task_token_policies(self._vault.sync_task_policy(task, specs), specs)
        return self._vault.create_task_token(
            task_id="pooled",
            task=task,
            policies=policies,
            ttl_seconds=ttl_max,
            meta={"task": task, "issued_by": "credential-broker"},
        )

    def _ask_refill(self, key: PoolKey, specs: Mapping[str, CredentialSpec]) -> None:
        self._wanted.put((key, specs))
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._refill_forever, name="token-pool", daemon=True)
                self._worker.start()

    def _refill_forever(self) -> None:
        while True:
            wanted = self._wanted.get()
            if wanted is None:
                return
            try:
                self._refill(*wanted)
            except VaultError as error:
                log.warning("task token pool refill failed: %s", error)

    def _refill(self, key: PoolKey, specs: Mapping[str, CredentialSpec]) -> None:
        while True:
            with self._lock:
                if self._closed or len(self._ready.setdefault(key, deque())) >= self._depth:
                    return
            token = self._mint(key, specs)
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
