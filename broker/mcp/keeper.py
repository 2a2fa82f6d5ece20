"""The tasks one `broker mcp` server started, and their credentials, in its memory only.

The model never sees a credential value: it gets task ids, states, credential names and
kinds, and the (redacted) output of commands run with the credentials in their environment.
Whatever this server started and did not finish is finished (`cancelled`) by `shutdown()`,
which the server calls when its client goes away or it is stopped.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.client import BrokerClient
from broker.client.env import credential_env
from broker.client.errors import BrokerAPIError, BrokerError
from broker.client.sdk import Outcome
from broker.mcp.process import CommandResult, run_bounded
from broker.mcp.redact import Redactor

log = logging.getLogger(__name__)

# Never handed to a command: with the workload's own token it could start tasks itself.
WITHHELD_ENV = frozenset(
    {
        "BROKER_WORKLOAD_TOKEN",
        "BROKER_TOKEN_FILE",
        "BROKER_ID_TOKEN",
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
        "ACTIONS_ID_TOKEN_REQUEST_URL",
    }
)
_ENDED = frozenset({"finished", "expired", "revoked", "denied", "approval_expired", "failed"})


class KeeperError(Exception):
    """A tool refusal of this server's own (not the broker's), with a stable code."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass
class HeldTask:
    task_id: str
    task: str
    # As the broker last answered: a copy for the tools' answers, never the ledger's state.
    last_state: str
    expires_at: str | None = None
    # name -> {kind, data, expires_at}, as the broker answered: the secrets.
    credentials: dict[str, Any] = field(default_factory=dict, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class TaskKeeper:
    def __init__(self, client: BrokerClient, *, environ: Mapping[str, str] | None = None) -> None:
        self.client = client
        self._environ = os.environ if environ is None else environ
        self._held: dict[str, HeldTask] = {}
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        # Held for the whole shutdown, so a second caller (a signal during the shutdown that
        # end of input began) returns only once every task is finished.
        self._shutdown_lock = threading.Lock()
        self._shut_down = False

    # -- tools ----------------------------------------------------------------------------------

    def task_types(self) -> list[dict[str, Any]]:
        return self.client.task_types()

    def start(
        self, task: str, owner: str, purpose: str, context: dict[str, Any] | None, ttl_seconds: int | None
    ) -> dict[str, Any]:
        self._refuse_when_stopping()
        answer = self.client.start(task, owner=owner, purpose=purpose, context=context, ttl=ttl_seconds)
        task_id = str(answer["task_id"])
        held = HeldTask(task_id, task, str(answer["state"]))
        self._hold(held, answer)
        with self._lock:
            self._held[task_id] = held
        if self.stopping.is_set():
            # Shutdown began while the broker answered: finish what it just gave us too.
            self._finish_quietly(held)
        return self._summary(held, answer)

    def status(self, task_id: str) -> dict[str, Any]:
        held = self._held_task(task_id, required=False)
        if held is None:
            return self._summary(None, self.client.get(task_id))
        with held.lock:
            return self._summary(held, self._refresh(held))

    def run(
        self, task_id: str, command: Sequence[str], cwd: str | None, timeout_seconds: float
    ) -> CommandResult:
        self._refuse_when_stopping()
        held = self._held_task(task_id, required=True)
        assert held is not None
        with held.lock:
            if held.last_state != "active":
                self._refresh(held)
            if held.last_state != "active" or not held.credentials:
                pending = held.last_state == "pending_approval"
                advice = "wait for its approval (task_status)" if pending else "start a new task"
                raise KeeperError("not_active", f"task {task_id} is {held.last_state}; {advice}")
            credentials = dict(held.credentials)
            expires_at = held.expires_at or ""
        env = {key: value for key, value in self._environ.items() if key not in WITHHELD_ENV}
        env.update(credential_env(credentials, task_id, expires_at))
        return run_bounded(
            command,
            env=env,
            cwd=cwd,
            timeout=timeout_seconds,
            redactor=Redactor([credentials]),
            stop=self.stopping,
        )

    def finish(self, task_id: str, outcome: Outcome) -> dict[str, Any]:
        held = self._held_task(task_id, required=False)
        answer = self.client.finish(task_id, outcome)
        if held is not None:
            with held.lock:
                self._forget(held, str(answer.get("state", "finished")))
        return self._summary(held, answer)

    # -- secrets, for redacting whatever leaves this server ---------------------------------------

    def redactor(self) -> Redactor:
        with self._lock:
            held = list(self._held.values())
        return Redactor([task.credentials for task in held])

    # -- shutdown -------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Kill running commands, then finish every task this server still holds. Runs once."""
        with self._shutdown_lock:
            if self._shut_down:
                return
            self.stopping.set()
            with self._lock:
                held = [task for task in self._held.values() if task.last_state not in _ENDED]
            for task in held:
                self._finish_quietly(task)
            self._shut_down = True

    def _finish_quietly(self, held: HeldTask) -> None:
        try:
            answer = self.client.finish(held.task_id, "cancelled")
        except BrokerAPIError as error:
            log.warning("could not finish task %s: %s (%s)", held.task_id, error.code, error.detail)
            return
        except BrokerError as error:
            # Client errors name the URL or token file and the error's type, never a secret.
            log.warning("could not finish task %s: %s", held.task_id, error)
            return
        self._forget(held, str(answer.get("state", "finished")))
        log.info("finished task %s (%s) on shutdown: %s", held.task_id, held.task, held.last_state)

    # -- helpers --------------------------------------------------------------------------------

    def _refuse_when_stopping(self) -> None:
        if self.stopping.is_set():
            raise KeeperError("shutting_down", "this MCP server is stopping")

    def _held_task(self, task_id: str, *, required: bool) -> HeldTask | None:
        with self._lock:
            held = self._held.get(task_id)
        if held is None and required:
            raise KeeperError("unknown_task_id", f"this MCP server did not start task {task_id}")
        return held

    def _hold(self, held: HeldTask, answer: Mapping[str, Any]) -> None:
        held.last_state = str(answer.get("state", held.last_state))
        held.expires_at = answer.get("expires_at") or held.expires_at
        if answer.get("credentials"):
            held.credentials = dict(answer["credentials"])

    def _refresh(self, held: HeldTask) -> dict[str, Any]:
        """Read the task; claim it here once its approval is granted. Caller holds `held.lock`."""
        document = self.client.get(held.task_id)
        approval = document.get("approval") or {}
        if document.get("state") == "pending_approval" and approval.get("state") == "approved":
            document = self.client.claim(held.task_id)
            self._hold(held, document)
            log.info("claimed task %s (%s) after its approval", held.task_id, held.task)
        elif document.get("state") in _ENDED:
            self._forget(held, str(document["state"]))
        else:
            self._hold(held, document)
        return document

    def _forget(self, held: HeldTask, state: str) -> None:
        held.last_state = state
        held.credentials = {}

    def _summary(self, held: HeldTask | None, answer: Mapping[str, Any]) -> dict[str, Any]:
        """What the model may see of a task: never `credentials` data, nor Vault lease ids."""
        state = str(answer.get("state"))
        summary: dict[str, Any] = {
            "task_id": str(answer.get("task_id")),
            "task": answer.get("task"),
            "state": state,
            "expires_at": answer.get("expires_at"),
        }
        for key in ("owner", "purpose", "finished_at", "outcome", "end_reason"):
            if key in answer:
                summary[key] = answer[key]
        held_credentials = held.credentials if held is not None else {}
        leases = {lease.get("name"): lease for lease in answer.get("leases") or []}
        names = sorted(set(held_credentials) | set(leases))
        summary["credentials"] = [_credential_summary(name, held_credentials, leases) for name in names]
        summary["credentials_held"] = bool(held_credentials)
        if state == "pending_approval" or answer.get("approval"):
            summary["approval"] = self._approval(summary["task_id"], str(summary["task"]), answer)
        summary["next"] = _next_step(state, held)
        return summary

    def _approval(self, task_id: str, task: str, answer: Mapping[str, Any]) -> dict[str, Any]:
        approval = answer.get("approval") or {}
        return {
            "state": approval.get("state", "pending"),
            "expires_at": approval.get("expires_at") or answer.get("approval_expires_at"),
            "approver_groups": self._approver_groups(task),
            "decisions": [
                {key: decision.get(key) for key in ("approver", "decision", "reason", "at")}
                for decision in approval.get("decisions") or []
            ],
            "console_url": f"{self.client.url}/console/approvals/{task_id}",
        }

    def _approver_groups(self, task: str) -> list[str]:
        # The 202 answer and the task document don't name the approvers; the catalogue does.
        try:
            types = self.client.task_types()
        except BrokerError:
            return []
        for entry in types:
            if entry.get("name") == task:
                return list(entry.get("approver_groups") or [])
        return []


def _credential_summary(name: str, held: Mapping[str, Any], leases: Mapping[str, Any]) -> dict[str, Any]:
    """Name, kind, lease state and expiry: the `data` (secrets) and Vault lease ids stay out."""
    source = held.get(name) or leases.get(name) or {}
    lease = leases.get(name) or {}
    return {
        "name": name,
        "kind": source.get("kind"),
        "state": lease.get("state", "active" if name in held else None),
        "expires_at": source.get("expires_at"),
    }


def _next_step(state: str, held: HeldTask | None) -> str:
    if state == "active" and held is not None and held.credentials:
        return "run commands with run_with_credentials; call finish_task when done"
    if state == "active":
        return "this server holds no credentials for this task (it did not start it)"
    if state == "pending_approval":
        return (
            "a human must approve this task (approver_groups, console_url); call task_status to "
            "check; this server claims the credentials itself once it is approved"
        )
    return "the task has ended; its credentials no longer work"
