"""Operator commands over the REST API: `broker leases ...`, `broker locks ...`, `broker tasks ...`.

They talk to a running broker with an operator token, exactly as curl would, so what an
SRE can do from a terminal is what the API allows and the audit log records.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click

from broker.cli.common import connection, page_options, print_page
from broker.client.operator import OperatorClient
from broker.lifecycle import LEASE_STATES, TASK_STATES

COLUMNS = ("id", "state", "task", "name", "workload", "owner", "purpose", "time_left")
# How much of a purpose a table row shows (the whole one is in --json and `leases show`).
PURPOSE_WIDTH = 40


def _filters(states: tuple[str, ...]) -> Callable[[Any], Any]:
    def decorate(func: Any) -> Any:
        for name in ("task-id", "task", "workload", "owner"):
            func = click.option(f"--{name}", help=f"Only rows with this {name.replace('-', '_')}.")(func)
        func = click.option("--state", type=click.Choice(states), help="Only rows in this state.")(func)
        return page_options(func)

    return decorate


@click.group()
def leases() -> None:
    """Inspect and revoke leases (operator token required).

    \b
    Examples:
      export BROKER_URL=https://broker.internal BROKER_TOKEN=$(get-sre-token)
      broker leases list --state active --owner alice@example.com
      broker leases show 3f0c...
      broker leases revoke 3f0c... --reason "INC-1234 suspicious queries"
      broker leases kill --workload spiffe://example.org/agents/x --reason "agent compromised"
    """


@leases.command("list")
@connection
@_filters(LEASE_STATES)
@click.option("--task-state", type=click.Choice(TASK_STATES), help="Only leases of tasks in this state.")
@click.option("--watch", is_flag=True, help="Redraw the table every --interval seconds until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(0.5, 300), default=2.0, show_default=True)
def list_leases(client: OperatorClient, as_json: bool, watch: bool, interval: float, **filters: Any) -> None:
    """List leases, newest first, with their purpose and the time each has left.

    \b
    Example:
      broker leases list --state active --owner alice@example.com
      broker leases list --state active --watch          # a live view; Ctrl-C stops
      broker leases list --state active --task-state revoked   # a kill switch in progress
      broker leases list --workload spiffe://example.org/agents/reporter --json
    """
    try:
        while True:
            page = client.list_leases(**filters)
            if watch and not as_json:
                click.clear()
                stamp = datetime.now(UTC).strftime("%H:%M:%S")
                click.echo(f"{stamp} UTC, every {interval:g} s (Ctrl-C stops)\n")
            print_page({**page, "items": [_with_time_left(item) for item in page["items"]]}, as_json, COLUMNS)
            if not watch:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return  # the way out of --watch, whenever it comes


def _with_time_left(lease: dict[str, Any], now: datetime | None = None) -> dict[str, Any]:
    """The row as shown: `time_left` until the lease's expiry while it is active."""
    row = dict(lease)
    purpose = str(row.get("purpose") or "")
    row["purpose"] = purpose if len(purpose) <= PURPOSE_WIDTH else purpose[: PURPOSE_WIDTH - 1] + "…"
    row["time_left"] = "-"
    if lease.get("state") == "active" and lease.get("expires_at"):
        left = datetime.fromisoformat(lease["expires_at"]) - (now or datetime.now(UTC))
        seconds = int(left.total_seconds())
        row["time_left"] = "expired" if seconds <= 0 else f"{seconds // 60}m{seconds % 60:02d}s"
    return row


@leases.command("show")
@connection
@click.argument("lease_id")
def show_lease(client: OperatorClient, lease_id: str) -> None:
    """Show one lease.

    \b
    Example:
      broker leases show 3f0c2a4e-...
    """
    click.echo(json.dumps(client.get_lease(lease_id), indent=2))


@leases.command("revoke")
@connection
@click.argument("lease_id")
@click.option("--reason", required=True, help="Why; recorded in the audit log.")
def revoke_lease(client: OperatorClient, lease_id: str, reason: str) -> None:
    """Revoke one lease now; exit 1 if Vault did not confirm yet (it is retried).

    \b
    Example:
      broker leases revoke 3f0c2a4e-... --reason "INC-1234 suspicious queries"
    """
    lease = client.revoke_lease(lease_id, reason)
    click.echo(f"{lease['id']}: {lease['state']}")
    if lease["state"] != "revoked":
        click.echo(f"Vault did not confirm yet ({lease.get('last_error')}); retried automatically", err=True)
        sys.exit(1)


@leases.command("kill")
@connection
@click.option("--reason", required=True, help="Why; recorded in the audit log.")
@click.option("--workload", help="Revoke everything this workload holds.")
@click.option("--owner", help="Revoke everything held for this owner.")
@click.option("--task", help="Revoke every task of this type.")
@click.option("--issuer", help="Revoke every task of workloads of this issuer.")
@click.option("--lock", is_flag=True, help="Also add a lock on the same filters (see `broker locks`).")
def kill(
    client: OperatorClient,
    reason: str,
    workload: str | None,
    owner: str | None,
    task: str | None,
    issuer: str | None,
    lock: bool,
) -> None:
    """Kill switch: end every open task matching all the given filters.

    The tasks are ended when this answers; the scheduler revokes their leases right after
    (watch with `broker leases list --state active --task-state revoked`).

    \b
    Example:
      broker leases kill --workload spiffe://example.org/agents/x --reason "agent compromised" --lock
      broker leases kill --owner alice@example.com --task deploy-prod --reason "offboarding"
    """
    if not (workload or owner or task or issuer):
        raise click.UsageError("name at least one of --workload, --owner, --task or --issuer")
    result = client.kill_switch(reason, workload=workload, owner=owner, task=task, issuer=issuer, lock=lock)
    click.echo(_revocation_line(result["revocation"]))
    if result.get("lock"):
        click.echo(f"lock {result['lock']['id']} added")


def _revocation_line(revocation: dict[str, Any]) -> str:
    return (
        f"{revocation['tasks']} task(s) ended; {revocation['pending_leases']} lease(s) being revoked"
        " by the scheduler"
    )


@click.group()
def locks() -> None:
    """Lock a workload, owner, task type or issuer out (operator token required).

    A lock refuses every matching start, claim and approval (403 `locked`), in every
    replica, until it is removed or expires; adding one also ends every open task it
    matches, as the kill switch does.

    \b
    Examples:
      broker locks add --workload spiffe://example.org/agents/x --reason "INC-1234 compromised"
      broker locks add --task deploy-prod --expires-in 3600 --reason "change freeze"
      broker locks list
      broker locks remove 5d2a...
    """


@locks.command("add")
@connection
@click.option("--reason", required=True, help="Why; recorded in the audit log.")
@click.option("--workload", help="Lock this workload (its exact identity).")
@click.option("--owner", help="Lock tasks for this owner.")
@click.option("--task", help="Lock this task type.")
@click.option("--issuer", help="Lock workloads of this token issuer.")
@click.option("--expires-in", type=click.IntRange(min=1), help="Seconds until the lock lapses by itself.")
def add_lock(
    client: OperatorClient,
    reason: str,
    workload: str | None,
    owner: str | None,
    task: str | None,
    issuer: str | None,
    expires_in: int | None,
) -> None:
    """Add a lock on all the given targets, and end every open task it matches.

    \b
    Example:
      broker locks add --workload spiffe://example.org/agents/x --reason "INC-1234 compromised"
    """
    if not (workload or owner or task or issuer):
        raise click.UsageError("name at least one of --workload, --owner, --task or --issuer")
    lock = client.add_lock(
        reason, workload=workload, owner=owner, task=task, issuer=issuer, expires_in=expires_in
    )
    click.echo(f"lock {lock['id']} added")
    click.echo(_revocation_line(lock["revocation"]))


@locks.command("list")
@connection
@click.option("--all", "include_ended", is_flag=True, help="Also removed and expired locks.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def list_locks(client: OperatorClient, as_json: bool, include_ended: bool) -> None:
    """List the live locks, newest first.

    \b
    Example:
      broker locks list --all --json
    """
    print_page(
        client.list_locks(include_ended=include_ended),
        as_json,
        ("id", "workload", "owner", "task", "issuer", "expires_at", "removed_at", "reason"),
    )


@locks.command("remove")
@connection
@click.argument("lock_id")
def remove_lock(client: OperatorClient, lock_id: str) -> None:
    """Remove a lock: what it refused may start again.

    \b
    Example:
      broker locks remove 5d2a7c10-...
    """
    lock = client.remove_lock(lock_id)
    click.echo(f"lock {lock['id']} removed at {lock['removed_at']}")


@click.group()
def tasks() -> None:
    """Inspect tasks (operator token required).

    \b
    Examples:
      broker tasks list --state active
      broker tasks show 9b1e...
    """


@tasks.command("list")
@connection
@_filters(TASK_STATES)
def list_tasks(client: OperatorClient, as_json: bool, **filters: Any) -> None:
    """List tasks, newest first.

    \b
    Example:
      broker tasks list --state pending_approval
      broker tasks list --owner alice@example.com --limit 20 --json
    """
    print_page(
        client.list_tasks(**filters), as_json, ("task_id", "state", "task", "workload", "owner", "expires_at")
    )


@tasks.command("show")
@connection
@click.argument("task_id")
def show_task(client: OperatorClient, task_id: str) -> None:
    """Show one task with its leases (never secret values).

    \b
    Example:
      broker tasks show 9b1e7c20-...
    """
    click.echo(json.dumps(client.get_task(task_id), indent=2))
