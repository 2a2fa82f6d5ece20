"""What the commands that read the broker's config share: the option's help, and loading it."""

from __future__ import annotations

import sys

import click

from broker.config import ConfigError, Settings, load_settings

CONFIG_HELP = "YAML config file (default: $BROKER_CONFIG)."


def settings_or_exit(config: str | None) -> Settings:
    """The settings, or the config error on stderr and exit 2 (a usage error, not a crash)."""
    try:
        return load_settings(config)
    except ConfigError as error:
        click.echo(str(error), err=True)
        sys.exit(2)
