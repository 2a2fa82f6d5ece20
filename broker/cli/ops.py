"""Operator commands over the REST API: `broker leases ...`, `broker tasks ...`.

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
import requests

from broker.lifecycle import LEASE_STATES, TASK_STATES

URL_HELP = "Broker base URL (default: $BROKER_URL)."
TOKEN_HELP = "Operator bearer token (default: $BROKER_TOKEN)."  # noqa: S105
COLUMNS = ("id", "state", "task", "name", "workload", "owner", "purpose", "time_left")
# How much of a purpose a table row shows (the whole one is in --json and `leases show`).
PURPOSE_WIDTH = 40


class Api:
    def __init__(self, url: str, token: str, timeout: float = 30) -> None:
        self._url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = timeout

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = requests.request(
                method, self._url + path, headers=self._headers, timeout=self._timeout, **kwargs
            )
        except requests.RequestException as error:
            raise click.ClickException(f"cannot reach {self._url}: {type(error).__name__}") from None
        if response.status_code >= 400:
            try:
                problem = response.json()
                message = f"{problem.get('code')}: {problem.get('detail')}"
            except ValueError:
                message = response.text[:200]
            raise click.ClickException(f"HTTP {response.status_code} {message}")
        return response.json()


def _connection(func: Any) -> Any:
    func = click.option("--token", envvar="BROKER_TOKEN", required=True, help=TOKEN_HELP)(func)
    return click.option("--url", envvar="BROKER_URL", required=True, help=URL_HELP)(func)


def _filters(states: tuple[str, ...]) -> Callable[[Any], Any]:
    def decorate(func: Any) -> Any:
        for name in ("task-id", "task", "workload", "owner"):
            func = click.option(f"--{name}", help=f"Only rows with this {name.replace('-', '_')}.")(func)
        func = click.option("--state", type=click.Choice(states), help="Only rows in this state.")(func)
        func = click.option("--cursor", help="Continue from the page that printed this cursor.")(func)
        func = click.option("--limit", type=click.IntRange(1, 500), default=100, show_default=True)(func)
        return click.option("--json", "as_json", is_flag=True, help="Print the raw JSON page.")(func)

    return decorate


def _query(**options: Any) -> dict[str, Any]:
    return {key: value for key, value in options.items() if value is not None}


def _table(items: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    rows = [[str(item.get(column) or "") for column in columns] for item in items]
    widths = [max([len(column), *(len(row[i]) for row in rows)]) for i, column in enumerate(columns)]
    click.echo("  ".join(column.upper().ljust(widths[i]) for i, column in enumerate(columns)))
    for row in rows:
        click.echo("  ".join(value.ljust(widths[i]) for i, value in enumerate(row)))


def _page(page: dict[str, Any], as_json: bool, columns: tuple[str, ...]) -> None:
    if as_json:
        click.echo(json.dumps(page, indent=2))
        return
    _table(page["items"], columns)
    if page.get("next_cursor"):
        click.echo(f"\nmore: --cursor {page['next_cursor']}", err=True)


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
@_connection
@_filters(LEASE_STATES)
@click.option("--watch", is_flag=True, help="Redraw the table every --interval seconds until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(0.5, 300), default=2.0, show_default=True)
def list_leases(
    url: str, token: str, as_json: bool, limit: int, watch: bool, interval: float, **filters: Any
) -> None:
    """List leases, newest first, with their purpose and the time each has left.

    \b
    Example:
      broker leases list --state active --owner alice@example.com
      broker leases list --state active --watch          # a live view; Ctrl-C stops
      broker leases list --workload spiffe://example.org/agents/reporter --json
    """
    api = Api(url, token)
    params = _query(limit=limit, **filters)
    try:
        while True:
            page = api.call("GET", "/leases", params=params)
            if watch and not as_json:
                click.clear()
                stamp = datetime.now(UTC).strftime("%H:%M:%S")
                click.echo(f"{stamp} UTC, every {interval:g} s (Ctrl-C stops)\n")
            _page({**page, "items": [_with_time_left(item) for item in page["items"]]}, as_json, COLUMNS)
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
@_connection
@click.argument("lease_id")
def show_lease(url: str, token: str, lease_id: str) -> None:
    """Show one lease.

    \b
    Example:
      broker leases show 3f0c2a4e-...
    """
    click.echo(json.dumps(Api(url, token).call("GET", f"/leases/{lease_id}"), indent=2))


@leases.command("revoke")
@_connection
@click.argument("lease_id")
@click.option("--reason", required=True, help="Why; recorded in the audit log.")
def revoke_lease(url: str, token: str, lease_id: str, reason: str) -> None:
    """Revoke one lease now; exit 1 if Vault did not confirm yet (it is retried).

    \b
    Example:
      broker leases revoke 3f0c2a4e-... --reason "INC-1234 suspicious queries"
    """
    lease = Api(url, token).call("POST", f"/leases/{lease_id}/revoke", json={"reason": reason})
    click.echo(f"{lease['id']}: {lease['state']}")
    if lease["state"] != "revoked":
        click.echo(f"Vault did not confirm yet ({lease.get('last_error')}); retried automatically", err=True)
        sys.exit(1)


@leases.command("kill")
@_connection
@click.option("--reason", required=True, help="Why; recorded in the audit log.")
@click.option("--workload", help="Revoke everything this workload holds.")
@click.option("--owner", help="Revoke everything held for this owner.")
@click.option("--task", help="Revoke every task of this type.")
def kill(
    url: str, token: str, reason: str, workload: str | None, owner: str | None, task: str | None
) -> None:
    """Kill switch: revoke every open task matching all the given filters.

    \b
    Example:
      broker leases kill --workload spiffe://example.org/agents/x --reason "agent compromised"
      broker leases kill --owner alice@example.com --task deploy-prod --reason "offboarding"
    """
    if not (workload or owner or task):
        raise click.UsageError("name at least one of --workload, --owner or --task")
    body = _query(reason=reason, workload=workload, owner=owner, task=task)
    result = Api(url, token).call("POST", "/leases/revoke", json=body)
    click.echo(
        f"{len(result['tasks'])} task(s) ended; {result['revoked']} lease(s) revoked, "
        f"{result['revoke_pending']} pending retry"
    )


@click.group()
def tasks() -> None:
    """Inspect tasks (operator token required).

    \b
    Examples:
      broker tasks list --state active
      broker tasks show 9b1e...
    """


@tasks.command("list")
@_connection
@_filters(TASK_STATES)
def list_tasks(url: str, token: str, as_json: bool, limit: int, **filters: Any) -> None:
    """List tasks, newest first.

    \b
    Example:
      broker tasks list --state pending_approval
      broker tasks list --owner alice@example.com --limit 20 --json
    """
    page = Api(url, token).call("GET", "/tasks", params=_query(limit=limit, **filters))
    _page(page, as_json, ("task_id", "state", "task", "workload", "owner", "expires_at"))


@tasks.command("show")
@_connection
@click.argument("task_id")
def show_task(url: str, token: str, task_id: str) -> None:
    """Show one task with its leases (never secret values).

    \b
    Example:
      broker tasks show 9b1e7c20-...
    """
    click.echo(json.dumps(Api(url, token).call("GET", f"/task/{task_id}"), indent=2))
