"""`broker audit tail` and `broker audit export`: the audit log out to a terminal or a SIEM.

They read the database named by the config (like `broker audit verify`), sealed events in
chain order, one JSON object a line in the schema of docs/audit.md.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import click

from broker.cli.common import CONFIG_HELP, settings_or_exit


def _rfc3339(_ctx: Any, _param: Any, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter("expected an RFC 3339 time such as 2026-12-01T00:00:00Z") from None
    if parsed.tzinfo is None:
        raise click.BadParameter("give the offset too, Z or +hh:mm")
    return parsed


def _print(rows: Iterable[Any]) -> int:
    from broker.audit.export import event_json

    last = 0
    for row in rows:
        click.echo(json.dumps(event_json(row), separators=(",", ":"), ensure_ascii=False))
        last = row.chain_seq or last
    sys.stdout.flush()
    return last


@click.command("export")
@click.option("--config", "config", envvar="BROKER_CONFIG", help=CONFIG_HELP)
@click.option("--since", callback=_rfc3339, required=True, help="Events at or after this RFC 3339 time.")
@click.option("--format", "fmt", type=click.Choice(["jsonl"]), default="jsonl", show_default=True)
def audit_export(config: str | None, since: datetime, fmt: str) -> None:
    """Print every sealed audit event since a time, oldest first, one JSON object a line.

    \b
    Example:
      broker audit export --config broker.yaml --since 2026-12-01T00:00:00Z > audit.jsonl
    """
    from broker.audit.export import iter_sealed
    from broker.db import make_engine, make_session_factory, unit_of_work

    engine = make_engine(settings_or_exit(config).sqlalchemy_url, pool_size=1)
    try:
        with unit_of_work(make_session_factory(engine)) as session:
            _print(iter_sealed(session, since=since))
    finally:
        engine.dispose()


@click.command("tail")
@click.option("--config", "config", envvar="BROKER_CONFIG", help=CONFIG_HELP)
@click.option("-n", "--lines", "count", type=click.IntRange(0, 10_000), default=20, show_default=True)
@click.option("-f", "--follow", is_flag=True, help="Keep printing events as they are sealed.")
@click.option("--interval", type=click.FloatRange(0.1, 60), default=1.0, show_default=True)
def audit_tail(config: str | None, count: int, follow: bool, interval: float) -> None:
    """Print the newest sealed audit events; with --follow, keep printing new ones.

    \b
    Examples:
      broker audit tail --config broker.yaml -n 50
      broker audit tail --config broker.yaml --follow | jq -c 'select(.event == "lease.revoked")'
    """
    from broker.audit.export import newest_sealed, sealed_after
    from broker.db import make_engine, make_session_factory, unit_of_work

    engine = make_engine(settings_or_exit(config).sqlalchemy_url, pool_size=1)
    sessions = make_session_factory(engine)
    try:
        with unit_of_work(sessions) as session:
            last = _print(newest_sealed(session, count)) if count else _newest_position(session)
        if follow:
            # On stderr, so a pipe into a SIEM or jq gets events only.
            click.echo(f"following the audit chain after position {last} (Ctrl-C stops)", err=True)
        while follow:
            time.sleep(interval)
            with unit_of_work(sessions) as session:
                last = max(last, _print(sealed_after(session, last)))
    except KeyboardInterrupt:
        pass
    finally:
        engine.dispose()


def _newest_position(session: Any) -> int:
    from broker.audit.export import newest_sealed

    newest = newest_sealed(session, 1)
    return newest[0].chain_seq or 0 if newest else 0
