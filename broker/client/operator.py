"""`OperatorClient`: the operators' and approvers' endpoints (docs/api.md), over the SDK's transport.

One class for both: the broker decides from the token what its holder may do, so an
approver's client simply gets `403 forbidden` from an operator endpoint. Every method
answers the broker's JSON as it came; lists answer one page (`{"items": [...],
"next_cursor": ...}`), and `next_cursor` is passed back as `cursor` for the next.

    from broker.client import OperatorClient

    operator = OperatorClient("https://broker.internal", sre_token)
    page = operator.list_leases(state="active", owner="alice@example.com")
    operator.revoke_lease(page["items"][0]["id"], reason="INC-1234 suspicious queries")

Retries follow `broker.client.transport`: reads, and revoking one lease (a revoked lease
is answered unchanged), are retried like the SDK's GETs; the kill switch and decisions,
whose repeat would be a second action or a `409`, only when nothing reached the broker.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal, TypedDict, Unpack

from broker.client.tokens import TokenSource
from broker.client.transport import ClientBase

Decision = Literal["approve", "deny"]
# The largest page the broker gives; a search through every page asks for this.
MAX_PAGE = 500


class RowFilters(TypedDict, total=False):
    """What `GET /leases` and `GET /tasks` filter on (exact matches, all of them), and paging."""

    state: str | None
    owner: str | None
    workload: str | None
    task: str | None
    task_id: str | None
    limit: int | None
    cursor: str | None


class LeaseFilters(RowFilters, total=False):
    """What `GET /leases` adds: leases of tasks in `task_state` (`active` leases of `revoked`
    tasks are what the scheduler has yet to revoke after a kill switch or a lock)."""

    task_state: str | None


class AuditFilters(RowFilters, total=False):
    """What `GET /audit` adds to those: one `event` name, and events `since` an RFC 3339 time
    (with its offset). There `workload` also matches the events that identity acted in."""

    event: str | None
    since: str | None


class OperatorClient(ClientBase):
    """A client of one broker as an operator or an approver (whichever its token is).

    `timeout` is longer than the SDK's: a revoke waits on Vault for the lease it ends
    before it answers.
    """

    def __init__(
        self, url: str, token: str | TokenSource, *, timeout: float = 30.0, retries: int = 3
    ) -> None:
        super().__init__(url, token, timeout=timeout, retries=retries)

    # -- operators: leases and tasks -------------------------------------------------------------

    def list_leases(self, **filters: Unpack[LeaseFilters]) -> dict[str, Any]:
        """GET /leases: a page of leases, newest first, matching all the filters given."""
        return self._page("/leases", filters)

    def get_lease(self, lease_id: str) -> dict[str, Any]:
        """GET /leases/{id}: one lease."""
        lease: dict[str, Any] = self._call("GET", f"/leases/{lease_id}", None, retry="safe")
        return lease

    def revoke_lease(self, lease_id: str, reason: str) -> dict[str, Any]:
        """POST /leases/{id}/revoke: the lease afterwards, `revoked` or `revoke_pending`."""
        body = {"reason": reason}
        lease: dict[str, Any] = self._call("POST", f"/leases/{lease_id}/revoke", body, retry="safe")
        return lease

    def kill_switch(
        self,
        reason: str,
        *,
        workload: str | None = None,
        owner: str | None = None,
        task: str | None = None,
        issuer: str | None = None,
        lock: bool = False,
    ) -> dict[str, Any]:
        """POST /leases/revoke: end every open task matching all the filters given.

        Answers `{"tasks": [...], "revocation": {"tasks": n, "pending_leases": m}, "lock": ...}`
        as soon as the tasks are recorded as ended; the scheduler revokes their leases
        after. With `lock`, also adds a lock on the same filters. The broker refuses the
        call without a filter (`ValidationError`).
        """
        body = _targets(reason, workload=workload, owner=owner, task=task, issuer=issuer)
        if lock:
            body["lock"] = True
        result: dict[str, Any] = self._call("POST", "/leases/revoke", body, retry="once")
        return result

    # -- operators: locks ------------------------------------------------------------------------

    def add_lock(
        self,
        reason: str,
        *,
        workload: str | None = None,
        owner: str | None = None,
        task: str | None = None,
        issuer: str | None = None,
        expires_in: int | None = None,
    ) -> dict[str, Any]:
        """POST /locks: refuse every matching start, claim and approval, and end every open
        task the lock matches. Answers the lock with a `revocation` block."""
        body = _targets(reason, workload=workload, owner=owner, task=task, issuer=issuer)
        if expires_in is not None:
            body["expires_in"] = expires_in
        lock: dict[str, Any] = self._call("POST", "/locks", body, retry="once")
        return lock

    def list_locks(self, *, include_ended: bool = False) -> dict[str, Any]:
        """GET /locks: the live locks (with `include_ended`, removed and expired ones too)."""
        params = {"state": "all" if include_ended else None}
        found: dict[str, Any] = self._call("GET", "/locks", None, retry="safe", params=params)
        return found

    def remove_lock(self, lock_id: str) -> dict[str, Any]:
        """DELETE /locks/{id}: the lock, removed (a repeat answers it unchanged)."""
        lock: dict[str, Any] = self._call("DELETE", f"/locks/{lock_id}", None, retry="safe")
        return lock

    def list_tasks(self, **filters: Unpack[RowFilters]) -> dict[str, Any]:
        """GET /tasks: a page of tasks with their leases, newest first, matching all the filters given."""
        return self._page("/tasks", filters)

    def get_task(self, task_id: str) -> dict[str, Any]:
        """GET /task/{id}: the task and its leases, never secret values."""
        found: dict[str, Any] = self._call("GET", f"/task/{task_id}", None, retry="safe")
        return found

    def list_audit(self, **filters: Unpack[AuditFilters]) -> dict[str, Any]:
        """GET /audit: a page of audit events, newest first, matching all the filters given."""
        return self._page("/audit", filters)

    # -- approvers -------------------------------------------------------------------------------

    def list_pending(self, *, limit: int | None = None, cursor: str | None = None) -> dict[str, Any]:
        """GET /approvals?state=pending: a page of the tasks this approver may decide, oldest first."""
        return self._page("/approvals", {"state": "pending", "limit": limit, "cursor": cursor})

    def iter_pending(self) -> Iterator[dict[str, Any]]:
        """Every task waiting for this approver, page after page."""
        cursor: str | None = None
        while True:
            page = self.list_pending(limit=MAX_PAGE, cursor=cursor)
            yield from page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def find_pending(self, task_id: str) -> dict[str, Any] | None:
        """The pending task with this id if it waits for this approver, else None.

        Approvers may not read tasks by id (that is the workload's and operators' right):
        what they may see is what waits for them, so the search is through that.
        """
        return next((item for item in self.iter_pending() if item.get("task_id") == task_id), None)

    def decide(self, task_id: str, decision: Decision, reason: str) -> dict[str, Any]:
        """POST /approvals/{id}: approve or deny; answers the task afterwards."""
        body = {"decision": decision, "reason": reason}
        found: dict[str, Any] = self._call("POST", f"/approvals/{task_id}", body, retry="once")
        return found

    # -- helpers ---------------------------------------------------------------------------------

    def _page(self, path: str, params: Mapping[str, object]) -> dict[str, Any]:
        page: dict[str, Any] = self._call("GET", path, None, retry="safe", params=params)
        return page


__all__ = ["MAX_PAGE", "AuditFilters", "Decision", "OperatorClient", "RowFilters"]


def _targets(reason: str, **targets: str | None) -> dict[str, Any]:
    return {"reason": reason, **{key: value for key, value in targets.items() if value is not None}}
