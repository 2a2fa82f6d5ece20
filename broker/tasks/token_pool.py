"""A small per-process pool of ready task tokens, so a start doesn't wait for Vault to mint one.

It lives with the tasks, not in `broker.vault`: it records tokens in the ledger
(`broker.ledger.pool` holds its SQL) and runs threads, where `broker.vault` only talks to Vault.

A task token is created through the task token role with the task type's policies and a
TTL of the type's *maximum* TTL (docs/contract.md §6.4: Vault's TTLs never exceed the task's maximum).
A start takes one whose remaining life covers its own TTL, records its accessor with the
task in the same transaction as the decision, and the pool refills in the background.
A token still in the pool has nothing alive under it: it was never used, or (with `reuse`)
its last task was finished through this process and every lease that task had was revoked
before the finish committed `token_released_at`. A token is lent to one task at a time
(`lend` when the start commits, `give_back_used` after the finish commits), so revoking it
for one task can never touch another's credentials. Tokens that aged past usefulness are
revoked as they are found.

Record before use (docs/contract.md §6.2): a token enters the pool only once its accessor
is committed to `task_tokens` under this process's holder id, and it leaves the record
only in the transaction that records it on its task. The holder renews its lease on its
rows every third of `lease_seconds`; a process that dies (SIGKILL included) stops
renewing, and the scheduler revokes its tokens once the lease has run out. The pool
lends a token only while its lease is surely unexpired by its own clock, and the
handover itself fails if the scheduler got there first (`TokenReclaimed`), so a token the
scheduler revokes is never one a task is using.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import queue
import secrets
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from broker.clock import Clock, SystemClock
from broker.credentials import CredentialSpec
from broker.db import unit_of_work
from broker.ledger import PoolRecord, record_pooled
from broker.vault import TaskToken, VaultError, VaultGateway, task_token_policies

log = logging.getLogger(__name__)

PoolKey = tuple[str, str, int]
# Ready tokens kept per task type, as a multiple of the pool's depth, when finishes hand
# back more than starts take; beyond that a returned token is revoked.
_MAX_READY_FACTOR = 4
# Of a lease, the part a token may be lent in after its last confirmed renewal: the rest
# covers a renewal's own round trip and the drift between this clock and the database's.
_LENDABLE_SHARE = 2 / 3


def _key(task: str, specs: Mapping[str, CredentialSpec], ttl_max: int) -> PoolKey:
    """Tokens are interchangeable within a task type, its credentials and its maximum TTL."""
    shape = json.dumps({name: spec.model_dump(mode="json") for name, spec in specs.items()}, sort_keys=True)
    return task, shape, ttl_max


def holder_id() -> str:
    """This process, as its pooled tokens' rows name it: the nonce tells a reused pid apart."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass(frozen=True)
class RecordedToken(TaskToken):
    """A token on record in `task_tokens`: the start that takes it must hand it over
    (`ledger.insert_task(pooled_token=True)`). `recorded_at`: when (time.monotonic) the
    write that last set its lease was sent."""

    recorded_at: float = field(default=0.0, compare=False)


class TokenReclaimed(Exception):
    """The scheduler revoked a pooled token before the start that took it could record it:
    this process's lease had lapsed (a database outage longer than the lease)."""


@dataclass(frozen=True)
class _Lent:
    token: TaskToken
    key: PoolKey
    until: datetime
    # Set by `pool_record`: when the finish's write of its pool row was about to be sent.
    recorded_at: float | None = None


@dataclass(frozen=True)
class _Work:
    """For the refill thread: fill `key` up (`specs`), or record and pool `adopt`."""

    key: PoolKey
    specs: Mapping[str, CredentialSpec] | None = None
    adopt: TaskToken | None = None


class TaskTokenPool:
    def __init__(
        self,
        vault: VaultGateway,
        clock: Clock | None = None,
        *,
        sessions: sessionmaker[Session] | None = None,
        depth: int = 2,
        margin_seconds: int = 5,
        reuse: bool = False,
        lease_seconds: float = 30.0,
    ) -> None:
        if (depth or reuse) and sessions is None:
            raise ValueError("a pool that holds tokens must record them: give it `sessions`")
        self._vault = vault
        self._clock = clock or SystemClock()
        self._sessions = sessions
        self._depth = depth
        self._margin = timedelta(seconds=margin_seconds)
        self._reuse = reuse
        self.holder = holder_id()
        self._lease = lease_seconds
        self._ready: dict[PoolKey, deque[RecordedToken]] = {}
        # Tokens of tasks this process started and that are still running, by task id,
        # with a heap of their deadlines so the ones that ended elsewhere are forgotten.
        self._lent: dict[uuid.UUID, _Lent] = {}
        self._lent_deadlines: list[tuple[datetime, uuid.UUID]] = []
        self._lock = threading.Lock()
        self._wanted: queue.Queue[_Work | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        # When (time.monotonic) the last renewal of every row of this holder was sent.
        self._renewed_at = float("-inf")
        # Rows to change at the next write: of tokens revoked here (deleted), and of tokens
        # this process failed to revoke (left to the scheduler, which retries).
        self._forget: list[str] = []
        self._abandon: list[str] = []
        self._renewer: threading.Thread | None = None
        self._stopping = threading.Event()
        self._closed = False

    def take(
        self, *, task: str, specs: Mapping[str, CredentialSpec], ttl_max: int, ttl_needed: int
    ) -> TaskToken:
        """A token for one task of type `task` that lives at least `ttl_needed` seconds.

        A freshly minted one is not on record: the caller records it on its task before use.
        """
        ready = self.take_ready(task=task, specs=specs, ttl_max=ttl_max, ttl_needed=ttl_needed)
        if ready is not None:
            return ready
        key = _key(task, specs, ttl_max)
        token = self._mint(key, specs)
        self._refill_behind(key, specs)
        return token

    def take_ready(
        self, *, task: str, specs: Mapping[str, CredentialSpec], ttl_max: int, ttl_needed: int
    ) -> RecordedToken | None:
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
            self._ask(_Work(key, specs=specs))

    def give_back(
        self, token: TaskToken, *, task: str, specs: Mapping[str, CredentialSpec], ttl_max: int
    ) -> None:
        """Return a token taken for a start that ended up issuing nothing (denied, pending).

        One minted for that start was never recorded: it is pooled once the refill thread
        has recorded it, off the caller's path.
        """
        key = _key(task, specs, ttl_max)
        if not isinstance(token, RecordedToken):
            if self._sessions is not None and not self._closed:
                self._ask(_Work(key, adopt=token))
            else:
                self._revoke_quietly(token)
            return
        with self._lock:
            if not self._closed:
                self._ready.setdefault(key, deque()).appendleft(token)
                return
        self._revoke_quietly(token)

    def revoked(self, token: TaskToken, *, ok: bool) -> None:
        """The caller revoked `token` (`ok`) or failed to: if it is on record, its row is
        deleted, or left for the scheduler to revoke, at the next write."""
        if isinstance(token, RecordedToken):
            with self._lock:
                (self._forget if ok else self._abandon).append(token.accessor)

    def forfeit_ready(self) -> None:
        """A pooled token was reclaimed: this process's lease lapsed, so none it pools is
        safe to lend; revoke them all and lend nothing until the next renewal."""
        with self._lock:
            self._renewed_at = float("-inf")
            dropped = [token for ready in self._ready.values() for token in ready]
            self._ready.clear()
        self._revoke_all(dropped)

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

    def pool_record(self, task_id: uuid.UUID) -> PoolRecord | None:
        """The row that records the token `task_id` holds as pooled here again: the finish
        that releases the token writes it in the same transaction (`write_back_end`)."""
        with self._lock:
            lent = self._lent.get(task_id)
            if lent is None or self._closed:
                return None
            self._lent[task_id] = replace(lent, recorded_at=time.monotonic())
        token = lent.token
        return PoolRecord(token.accessor, lent.key[0], token.expires_at, self.holder, self._lease)

    def give_back_used(self, task_id: uuid.UUID) -> None:
        """Pool the token of a task that ended here with every lease revoked.

        The caller has committed the task's `token_released_at` and the token's pool row
        (`pool_record`) first, so the scheduler will not retire the token under the next
        task that takes it, and it is on record while pooled.
        """
        with self._lock:
            lent = self._lent.pop(task_id, None)
            if lent is None:
                return
            if lent.recorded_at is None:  # not on record as pooled: never pool it
                token: TaskToken = lent.token
            else:
                token = _recorded(lent.token, lent.recorded_at)
            ready = self._ready.setdefault(lent.key, deque())
            if (
                isinstance(token, RecordedToken)
                and not self._closed
                and len(ready) < max(self._depth, 1) * _MAX_READY_FACTOR
            ):
                ready.appendleft(token)
                self._start_renewing()
                return
        self._revoke_all([token])  # more ready than starts want: no need to keep it

    def _pop_fresh(self, key: PoolKey, ttl_needed: int) -> RecordedToken | None:
        deadline = self._clock.now() + timedelta(seconds=ttl_needed) + self._margin
        # A lease renewed (or a row written) before this may have run out by the database's
        # clock: the scheduler may be revoking the token already.
        lendable_after = time.monotonic() - self._lease * _LENDABLE_SHARE
        stale = []
        token: RecordedToken | None = None
        with self._lock:
            ready = self._ready.setdefault(key, deque())
            while ready:
                candidate = ready.popleft()
                if candidate.expires_at < deadline:
                    stale.append(candidate)
                elif max(candidate.recorded_at, self._renewed_at) < lendable_after:
                    ready.appendleft(candidate)  # in doubt; the next renewal decides
                    break
                else:
                    token = candidate
                    break
        self._revoke_all(stale)
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

    # -- the refill thread --------------------------------------------------------------

    def _ask(self, work: _Work) -> None:
        self._wanted.put(work)
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._refill_forever, name="token-pool", daemon=True)
                self._worker.start()

    def _refill_forever(self) -> None:
        while True:
            work = self._wanted.get()
            if work is None:
                return
            try:
                if work.adopt is not None:
                    self._adopt(work.key, work.adopt)
                elif work.specs is not None:
                    self._refill(work.key, work.specs)
            except VaultError as error:
                log.warning("task token pool refill failed: %s", error)

    def _refill(self, key: PoolKey, specs: Mapping[str, CredentialSpec]) -> None:
        while True:
            with self._lock:
                missing = 0 if self._closed else self._depth - len(self._ready.setdefault(key, deque()))
            if missing <= 0:
                return
            minted: list[TaskToken] = []
            try:
                for _ in range(missing):
                    minted.append(self._mint(key, specs))
            finally:
                # One write records the whole batch, also what was minted before an error.
                pooled = self._pool(key, self._record(key, minted))
            if not pooled:
                return

    def _adopt(self, key: PoolKey, token: TaskToken) -> None:
        with self._lock:
            room = len(self._ready.get(key, ())) < max(self._depth, 1) * _MAX_READY_FACTOR
        if room:
            self._pool(key, self._record(key, [token]))
        else:  # refused starts hand back more than starts take
            self._revoke_quietly(token)

    def _record(self, key: PoolKey, tokens: list[TaskToken]) -> list[RecordedToken]:
        """Commit `tokens` as held here (renewing every lease of this holder with them);
        on any failure they are revoked, never pooled unrecorded."""
        if not tokens:
            return []
        records = [
            PoolRecord(token.accessor, key[0], token.expires_at, self.holder, self._lease) for token in tokens
        ]
        sent = time.monotonic()
        if not self._write(records):
            self._revoke_all(tokens)
            return []
        return [_recorded(token, sent) for token in tokens]

    def _pool(self, key: PoolKey, tokens: list[RecordedToken]) -> bool:
        if not tokens:
            return False
        with self._lock:
            if not self._closed:
                self._ready.setdefault(key, deque()).extend(tokens)
                self._start_renewing()
                return True
        self._revoke_all(tokens)  # recorded while the pool was closing: drop their rows too
        self._write([])
        return False

    # -- the lease --------------------------------------------------------------------

    def _start_renewing(self) -> None:
        """Called with the lock held, once there is something to hold."""
        if self._renewer is None:
            self._renewer = threading.Thread(target=self._renew_forever, name="token-pool-lease", daemon=True)
            self._renewer.start()

    def _renew_forever(self) -> None:
        while not self._stopping.wait(self._lease / 3):
            self._write([])

    def _write(self, records: list[PoolRecord]) -> bool:
        """Record `records`, renew this holder's lease and delete forgotten rows: one
        transaction. A renewal that comes after the lease was in doubt drops what the
        scheduler may have revoked meanwhile."""
        assert self._sessions is not None
        sent = time.monotonic()
        with self._lock:
            forget, self._forget = self._forget, []
            abandon, self._abandon = self._abandon, []
        try:
            with unit_of_work(self._sessions) as session:
                record_pooled(
                    session, holder=self.holder, lease_seconds=self._lease, tokens=records,
                    forget=forget, abandon=abandon,
                )  # fmt: skip
        except Exception as error:  # whatever the database said, nothing was recorded
            log.warning("could not record or renew this process's pooled task tokens: %s", error)
            with self._lock:
                self._forget[:0] = forget
                self._abandon[:0] = abandon
            return False
        in_doubt = []
        with self._lock:
            lendable_after = sent - self._lease * _LENDABLE_SHARE
            for ready in self._ready.values():
                doubtful = [t for t in ready if max(t.recorded_at, self._renewed_at) < lendable_after]
                for token in doubtful:
                    ready.remove(token)
                in_doubt += doubtful
            self._renewed_at = max(self._renewed_at, sent)
        self._revoke_all(in_doubt)
        return True

    # -- revoking -----------------------------------------------------------------------

    def _revoke_all(self, tokens: Iterable[TaskToken]) -> None:
        for token in tokens:
            self._revoke_quietly(token)

    def _revoke_quietly(self, token: TaskToken) -> None:
        try:
            self._vault.revoke_task_token(token.accessor)
        except VaultError as error:
            log.info("could not revoke a pooled task token; the scheduler will: %s", error)
            self.revoked(token, ok=False)
            return
        self.revoked(token, ok=True)

    def close(self) -> None:
        """Stop refilling and revoke what is still pooled (best effort), and its rows."""
        self._wanted.put(None)
        self._stopping.set()
        with self._lock:
            self._closed = True
            pooled = [token for ready in self._ready.values() for token in ready]
            self._ready.clear()
        self._revoke_all(pooled)
        if self._sessions is not None and (self._forget or self._abandon):
            # What this leaves behind lapses with the lease and is reclaimed by the scheduler.
            self._write([])


def _recorded(token: TaskToken, at: float) -> RecordedToken:
    return RecordedToken(
        token=token.token, accessor=token.accessor, expires_at=token.expires_at, recorded_at=at
    )
