"""`BrokerClient`: the broker's task API for agents and CI jobs, with safe retries.

What is retried, and why it is safe:

- GET requests and `/task/finish` (finishing twice changes nothing on the server): on
  connection errors, 429 and 503.
- `/task/start`: on the same failures, always with the `Idempotency-Key` the first
  attempt carried, so a server that honours it answers the retry with the same task.
- `/task/claim`: a claim works once, so a claim whose answer may have been lost is not
  repeated; it is retried only when the request never reached the broker (connect
  errors) or the broker said nothing happened (429, 503).

Every attempt asks the token source again, so rotated files and single-use issuers work.
The requests themselves go through `broker.client.transport`, shared with `OperatorClient`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from broker.client.errors import (
    ApprovalDenied,
    ApprovalTimeout,
    BrokerAPIError,
    BrokerError,
    Conflict,
    StartAnswerLost,
)
from broker.client.tokens import TokenSource
from broker.client.transport import ClientBase

log = logging.getLogger(__name__)

Outcome = Literal["succeeded", "failed", "cancelled"]
# Task states after which a pending approval can never be claimed.
_ENDED = {"denied", "approval_expired", "finished", "revoked", "expired", "failed"}


def parse_time(value: str) -> datetime:
    """An RFC 3339 time from the broker (`2026-11-28T14:29:21.858Z`) as an aware datetime."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


@dataclass(frozen=True)
class Credential:
    """One issued credential. `data` holds secrets: its values are kept out of `repr`."""

    kind: str
    data: dict[str, Any] = field(repr=False)
    expires_at: datetime | None
    # `gateway`: `data` is a handle for the broker's gateway (docs/gateway.md), used as is.
    delivery: str = "direct"

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __repr__(self) -> str:
        fields = ", ".join(sorted(self.data))
        return (
            f"Credential(kind={self.kind!r}, delivery={self.delivery!r}, data=<{fields}: hidden>,"
            f" expires_at={self.expires_at!r})"
        )


@dataclass(frozen=True)
class ActiveTask:
    """A started (or claimed) task: its id, deadline and credentials by name."""

    id: str
    expires_at: datetime
    credentials: dict[str, Credential] = field(repr=False)
    document: dict[str, Any] = field(repr=False)
    """The broker's answer without `credentials` (state, leases, ...)."""

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> ActiveTask:
        credentials = {
            name: Credential(
                kind=item["kind"],
                data=dict(item["data"]),
                expires_at=parse_time(item["expires_at"]) if item.get("expires_at") else None,
                delivery=str(item.get("delivery", "direct")),
            )
            for name, item in (answer.get("credentials") or {}).items()
        }
        document = {key: value for key, value in answer.items() if key != "credentials"}
        return cls(str(answer["task_id"]), parse_time(answer["expires_at"]), credentials, document)

    def __repr__(self) -> str:
        names = sorted(self.credentials)
        return f"ActiveTask(id={self.id!r}, expires_at={self.expires_at!r}, credentials={names})"


def approver_groups(document: Mapping[str, Any]) -> list[str]:
    """The approver groups a task document names, if it names any (newer brokers may)."""
    approval = document.get("approval")
    for holder in (approval if isinstance(approval, Mapping) else {}, document):
        approvers = holder.get("approvers")
        if isinstance(approvers, Mapping):
            approvers = approvers.get("groups")
        if isinstance(approvers, list) and all(isinstance(item, str) for item in approvers):
            return list(approvers)
    return []


class BrokerClient(ClientBase):
    """A client of one broker, authenticated as one workload.

    `token` is a JWT string or a `TokenSource` (asked again before every request).
    `timeout` bounds each HTTP request; `retries` is how many times a failed request is
    tried again when that is safe (see the module's docstring).
    """

    def __init__(
        self,
        url: str,
        token: str | TokenSource,
        *,
        timeout: float = 10.0,
        retries: int = 3,
    ) -> None:
        super().__init__(url, token, timeout=timeout, retries=retries)

    # -- the API -------------------------------------------------------------------------------

    def start(
        self,
        task: str,
        *,
        owner: str,
        purpose: str,
        context: Mapping[str, Any] | None = None,
        ttl: int | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """POST /task/start. The raw answer: 201 `active` with `credentials`, or 202 `pending_approval`.

        A fresh `Idempotency-Key` (uuid4) is made unless one is given; every retry of this
        start sends the same key, so a start whose answer was lost never leaves a second task.
        With a key made here, a 409 naming a task can only be this call's own lost start: that
        task is finished and `StartAnswerLost` raised (its credentials can't be sent again).
        With a key you gave, the 409 (`Conflict`, `.body["task_id"]`) is yours to handle.
        """
        body: dict[str, Any] = {"task": task, "owner": owner, "purpose": purpose}
        if context is not None:
            body["context"] = dict(context)
        if ttl is not None:
            body["ttl_seconds"] = ttl
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        try:
            answer: dict[str, Any] = self._call("POST", "/task/start", body, retry="keyed", headers=headers)
        except Conflict as conflict:
            lost = conflict.body.get("task_id")
            if idempotency_key is not None or not isinstance(lost, str):
                raise
            with contextlib.suppress(BrokerError):
                self.finish(lost, "cancelled")
            raise StartAnswerLost(lost, conflict.body) from None
        return answer

    def claim(self, task_id: str) -> dict[str, Any]:
        """POST /task/claim: the credentials of an approved task (works once)."""
        answer: dict[str, Any] = self._call("POST", "/task/claim", {"task_id": task_id}, retry="once")
        return answer

    def finish(self, task_id: str, outcome: Outcome = "succeeded") -> dict[str, Any]:
        """POST /task/finish: every lease is revoked before the answer. Safe to repeat."""
        body = {"task_id": task_id, "outcome": outcome}
        answer: dict[str, Any] = self._call("POST", "/task/finish", body, retry="safe")
        return answer

    def get(self, task_id: str) -> dict[str, Any]:
        """GET /task/{id}: the task and its leases, never secret values."""
        answer: dict[str, Any] = self._call("GET", f"/task/{task_id}", None, retry="safe")
        return answer

    def task_types(self) -> list[dict[str, Any]]:
        """GET /task-types: the task types this workload may start (a newer broker endpoint)."""
        answer = self._call("GET", "/task-types", None, retry="safe")
        if isinstance(answer, Mapping):
            answer = answer.get("items", answer.get("task_types", []))
        return list(answer)

    def wait_for_approval(
        self, task_id: str, *, timeout: float, poll: float = 1.0, max_poll: float = 15.0
    ) -> dict[str, Any]:
        """Poll GET /task/{id} until the approval is decided, then claim it.

        Answers the claim (the task, `active`, with `credentials`). Polls start every
        `poll` seconds and back off (doubling, with jitter, up to `max_poll`) so a long
        wait costs the broker little. Raises `ApprovalDenied` when the task was denied,
        lapsed or ended, and `ApprovalTimeout` after `timeout` seconds without a decision
        (the task is then still pending: finish it to withdraw the request).
        """
        deadline = time.monotonic() + timeout
        interval = poll
        while True:
            document = self.get(task_id)
            approval = document.get("approval") if isinstance(document.get("approval"), Mapping) else {}
            approval_state = approval.get("state") if approval else None
            state = document.get("state")
            if state == "pending_approval" and approval_state == "approved":
                return self.claim(task_id)
            if state in _ENDED or approval_state in {"denied", "lapsed"}:
                reason = document.get("end_reason") or approval_state or state
                raise ApprovalDenied(task_id, f"task {task_id} was not approved: {reason}", document)
            if state != "pending_approval" or approval_state == "claimed":
                raise Conflict(409, "conflict", f"task {task_id} is {state}, not waiting for approval", {})
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                groups = approver_groups(document)
                who = f" (approvers: {', '.join(groups)})" if groups else ""
                raise ApprovalTimeout(
                    task_id, f"task {task_id} still awaits approval after {timeout:g}s{who}", document, groups
                )
            self._sleep(min(remaining, interval * random.uniform(0.8, 1.2)))  # noqa: S311 - jitter only
            interval = min(max_poll, interval * 2)

    @contextmanager
    def task(
        self,
        task: str,
        *,
        owner: str,
        purpose: str,
        context: Mapping[str, Any] | None = None,
        ttl: int | None = None,
        wait: float | None = None,
    ) -> Iterator[ActiveTask]:
        """Start a task, yield it, and finish it however the block ends.

        The outcome is `succeeded` when the block ends normally, `cancelled` on
        KeyboardInterrupt and `failed` on any other exception, which is re-raised. A task
        that needs approval is waited for up to `wait` seconds; with `wait=None` (or when
        the wait runs out) the pending request is withdrawn and `ApprovalTimeout` raised.
        """
        answer = self.start(task, owner=owner, purpose=purpose, context=context, ttl=ttl)
        if answer.get("state") == "pending_approval":
            answer = self._await_claim(str(answer["task_id"]), wait)
        active = ActiveTask.from_answer(answer)
        try:
            yield active
        except KeyboardInterrupt:
            self._finish_quietly(active.id, "cancelled")
            raise
        except BaseException:
            self._finish_quietly(active.id, "failed")
            raise
        self.finish(active.id, "succeeded")

    # -- helpers -------------------------------------------------------------------------------

    def _await_claim(self, task_id: str, wait: float | None) -> dict[str, Any]:
        try:
            if wait is None:
                raise ApprovalTimeout(
                    task_id, f"task {task_id} needs approval; pass wait=SECONDS to wait for it"
                )
            return self.wait_for_approval(task_id, timeout=wait)
        except BaseException:
            # A request nobody waits for anymore should not sit in approvers' queues (nor
            # count against the workload's limits); after a denial this changes nothing.
            self._finish_quietly(task_id, "cancelled")
            raise

    def _finish_quietly(self, task_id: str, outcome: Outcome) -> None:
        """Finish while another exception is on its way out: don't mask it, but say so."""
        try:
            self.finish(task_id, outcome)
        except Exception as error:
            log.warning(
                "could not finish task %s (%s); the broker revokes it at its deadline", task_id, error
            )


__all__ = ["ActiveTask", "BrokerAPIError", "BrokerClient", "Credential", "Outcome", "parse_time"]
