"""Approver commands over the REST API: `broker approvals list|show|approve|deny`.

Same conventions as `broker leases`: `--url`/`$BROKER_URL`, `--token`/`$BROKER_TOKEN` (here an
approver's token), a table by default and `--json` for the raw page. Every decision goes
through `POST /approvals/{task_id}`, so the CLI can do exactly what the API lets this
approver do, and the audit log names them.
"""

from __future__ import annotations

import json

import click

from broker.cli.common import connection, page_options, print_page
from broker.client.operator import Decision, OperatorClient

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
@connection
@page_options
def list_pending(client: OperatorClient, as_json: bool, limit: int, cursor: str | None) -> None:
    """List the tasks waiting for this approver, oldest first.

    \b
    Example:
      broker approvals list --json | jq -r '.items[].task_id'
    """
    print_page(client.list_pending(limit=limit, cursor=cursor), as_json, COLUMNS)


@approvals.command("show")
@connection
@click.argument("task_id")
def show(client: OperatorClient, task_id: str) -> None:
    """Show the whole request of one pending task: owner, purpose, context, TTL.

    \b
    Example:
      broker approvals show 9b1e...
    """
    found = client.find_pending(task_id)
    if found is None:
        raise click.ClickException(f"{task_id} is not waiting for you (decided, lapsed or not yours)")
    click.echo(json.dumps(found, indent=2))


def _decide(client: OperatorClient, task_id: str, decision: Decision, reason: str) -> None:
    task = client.decide(task_id, decision, reason)
    approval = task.get("approval") or {}
    click.echo(f"{task['task_id']}: {task['state']} (approval {approval.get('state', decision)})")


@approvals.command("approve")
@connection
@click.argument("task_id")
@click.option("--reason", required=True, help="Why; recorded in the audit log and shown to the requester.")
def approve(client: OperatorClient, task_id: str, reason: str) -> None:
    """Approve a pending task; the workload then claims its credentials once.

    \b
    Example:
      broker approvals approve 9b1e... --reason "CHG-42 approved in CAB"
    """
    _decide(client, task_id, "approve", reason)


@approvals.command("deny")
@connection
@click.argument("task_id")
@click.option("--reason", required=True, help="Why; recorded in the audit log and shown to the requester.")
def deny(client: OperatorClient, task_id: str, reason: str) -> None:
    """Deny a pending task; nothing is ever issued for it.

    \b
    Example:
      broker approvals deny 9b1e... --reason "no change ticket"
    """
    _decide(client, task_id, "deny", reason)
