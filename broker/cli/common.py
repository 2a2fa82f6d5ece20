"""What the `broker` commands share: loading the config, and talking to a broker over REST.

The REST half (`connection`, `page_options`, `print_page`) is what `broker leases`,
`broker tasks` and `broker approvals` have in common: `--url`/`--token` made into an
`OperatorClient`, the client's errors shown as `HTTP <status> <code>: <detail>`, and a page
printed as a table (or as the raw JSON) with the cursor of the next one.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from broker.client.errors import BrokerAPIError, BrokerUnreachable
from broker.client.operator import MAX_PAGE, OperatorClient
from broker.config import ConfigError, Settings, load_settings

CONFIG_HELP = "YAML config file (default: $BROKER_CONFIG)."
URL_HELP = "Broker base URL (default: $BROKER_URL)."
TOKEN_HELP = "Operator bearer token (default: $BROKER_TOKEN)."  # noqa: S105


def settings_or_exit(config: str | None) -> Settings:
    """The settings, or the config error on stderr and exit 2 (a usage error, not a crash)."""
    try:
        return load_settings(config)
    except ConfigError as error:
        click.echo(str(error), err=True)
        sys.exit(2)


def connection(func: Callable[..., None]) -> Callable[..., None]:
    """Add `--url` and `--token`; the command gets the `OperatorClient` they make as `client`.

    What the client raises becomes a click error (exit 1): the problem's status, code and
    detail, which the broker writes for the caller, or that no answer came.
    """

    @functools.wraps(func)
    def run(url: str, token: str, **options: Any) -> None:
        try:
            client = OperatorClient(url, token)
        except ValueError as error:
            raise click.UsageError(str(error)) from None
        try:
            func(client=client, **options)
        except BrokerAPIError as error:
            raise click.ClickException(f"HTTP {error.status} {error.code}: {error.detail}") from None
        except BrokerUnreachable as error:
            raise click.ClickException(f"cannot reach the broker: {error}") from None

    run = click.option("--token", envvar="BROKER_TOKEN", required=True, help=TOKEN_HELP)(run)
    return click.option("--url", envvar="BROKER_URL", required=True, help=URL_HELP)(run)


def page_options(func: Callable[..., None]) -> Callable[..., None]:
    """Add `--cursor`, `--limit` and `--json` (as `as_json`), the paging of every list."""
    func = click.option("--cursor", help="Continue from the page that printed this cursor.")(func)
    func = click.option("--limit", type=click.IntRange(1, MAX_PAGE), default=100, show_default=True)(func)
    return click.option("--json", "as_json", is_flag=True, help="Print the raw JSON page.")(func)


def print_page(page: dict[str, Any], as_json: bool, columns: tuple[str, ...]) -> None:
    """The page as a table of these columns, and the next page's cursor on stderr; or its JSON."""
    if as_json:
        click.echo(json.dumps(page, indent=2))
        return
    _table(page["items"], columns)
    if page.get("next_cursor"):
        click.echo(f"\nmore: --cursor {page['next_cursor']}", err=True)


def _table(items: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    rows = [[str(item.get(column) or "") for column in columns] for item in items]
    widths = [max([len(column), *(len(row[i]) for row in rows)]) for i, column in enumerate(columns)]
    click.echo("  ".join(column.upper().ljust(widths[i]) for i, column in enumerate(columns)))
    for row in rows:
        click.echo("  ".join(value.ljust(widths[i]) for i, value in enumerate(row)))
