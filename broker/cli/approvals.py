"""Approver commands over the REST API: `broker approvals list|show|approve|deny`.

Same conventions as `broker leases`: `--url`/`$BROKER_URL`, `--token`/`$BROKER_TOKEN` (here an
approver's token), a table by default and `--json` for the raw page. Every decision goes
through `POST /approvals/{task_id}`, so the CLI can do exactly what the API lets this
approver do, and the audit log names them.
"""

from __future__ import annotations

import json
from typing import Any

import click

from broker.cli.ops import Api, _connection, _page

COLUMNS = ("task_id", "task", "owner", "workload", "purpose", "approval_expires_at")


@click.group()
def approvals() -> None:
    """Review and decide pending tasks (approver token required).

    \b
    Examples:
      export BROKER_URL=https://broker.internal BROKER_TOKEN=$(get-approver-token)
      broker approvals list
      broker approvals show 9b1e...
      broker approvals approve 9b1e... --reason "CHG-42 approved in CAB"
      broker approvals deny 9b1e... --reason "no change ticket"
    """


@approvals.command("list")
@_connection
@click.option("--limit", type=click.IntRange(1, 500), default=100, show_default=True)
@click.option("--cursor", help="Continue from the page that printed this cursor.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON page.")
def list_pending(url: str, token: str, limit: int, cursor: str | None, as_json: bool) -> None:
    """List the tasks waiting for this approver, oldest first.

    \b
    Example:
      broker approvals list --json | jq -r '.items[].task_id'
    """
    params: dict[str, Any] = {"state": "pending", "limit": limit}
    if cursor:
        params["cursor"] = cursor
    _page(Api(url, token).call("GET", "/approvals", params=params), as_json, COLUMNS)


@approvals.command("show")
@_connection
@click.argument("task_id")
def show(url: str, token: str, task_id: str) -> None:
    """Show the whole request of one pending task: owner, purpose, context, TTL.

    \b
    Example:
      broker approvals show 9b1e...
    """
    click.echo(json.dumps(_find_pending(Api(url, token), task_id), indent=2))


def _find_pending(api: Api, task_id: str) -> dict[str, Any]:
    # Approvers may not read tasks by id (that is the workload's and operators' right):
    # what they may see is what waits for them, so look there.
    params: dict[str, Any] = {"state": "pending", "limit": 500}
    while True:
        page = api.call("GET", "/approvals", params=params)
        for item in page["items"]:
            if item.get("task_id") == task_id:
                found: dict[str, Any] = item
                return found
        if not page.get("next_cursor"):
            raise click.ClickException(f"{task_id} is not waiting for you (decided, lapsed or not yours)")
        params["cursor"] = page["next_cursor"]


def _decide(url: str, token: str, task_id: str, decision: str, reason: str) -> None:
    body = {"decision": decision, "reason": reason}
    task = Api(url, token).call("POST", f"/approvals/{task_id}", json=body)
    approval = task.get("approval") or {}
    click.echo(f"{task['task_id']}: {task['state']} (approval {approval.get('state', decision)})")


@approvals.command("approve")
@_connection
@click.argument("task_id")
@click.option("--reason", required=True, help="Why; recorded in the audit log and shown to the requester.")
def approve(url: str, token: str, task_id: str, reason: str) -> None:
    """Approve a pending task; the workload then claims its credentials once.

    \b
    Example:
      broker approvals approve 9b1e... --reason "CHG-42 approved in CAB"
    """
    _decide(url, token, task_id, "approve", reason)


@approvals.command("deny")
@_connection
@click.argument("task_id")
@click.option("--reason", required=True, help="Why; recorded in the audit log and shown to the requester.")
def deny(url: str, token: str, task_id: str, reason: str) -> None:
    """Deny a pending task; nothing is ever issued for it.

    \b
    Example:
      broker approvals deny 9b1e... --reason "no change ticket"
    """
    _decide(url, token, task_id, "deny", reason)
