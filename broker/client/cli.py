"""`broker exec`: the click command, free of the server's CLI so a client install needs no Flask.

Registered in the main CLI as `broker exec`; also runnable as `python -m broker.client.cli`.
"""

from __future__ import annotations

import sys

import click

from broker.client.errors import TokenSourceError
from broker.client.exec import WRAPPER_FAILED, run
from broker.client.sdk import BrokerClient
from broker.client.tokens import DEFAULT_AUDIENCE, SOURCE_NAMES, resolve_token_source

EPILOG = """\b
Examples:
  broker exec --task analytics-read --owner alice@example.com \\
      --purpose "weekly revenue report" --context environment=staging \\
      -- python report.py
  broker exec --token-file /var/run/secrets/tokens/broker --task analytics-read \\
      --owner alice@example.com --purpose "nightly export" --context environment=prod \\
      --env 'DATABASE_URL=postgresql://{DB_USERNAME}:{DB_PASSWORD}@db:5432/analytics' \\
      -- ./export.sh
  broker exec --token-source gitlab --task deploy-prod --owner "$GITLAB_USER_EMAIL" \\
      --purpose "release $CI_COMMIT_TAG" --context environment=prod --wait 900 -- ./deploy.sh

\b
The command sees each credential field as <NAME>_<FIELD> (credential db: DB_USERNAME,
DB_PASSWORD), plus BROKER_TASK_ID and BROKER_TASK_EXPIRES_AT. The task is finished when
the command ends: succeeded on exit 0, failed otherwise, cancelled when it ends after a
SIGINT/SIGTERM/SIGHUP that broker exec passed on. The exit status is the command's
(128+N if it died of signal N); 125 means broker exec itself failed (nothing ran).
"""


def _pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {key[:40]!r}", param_hint=option)
        pairs[key] = text
    return pairs


@click.command(
    "exec",
    epilog=EPILOG,
    context_settings={
        "help_option_names": ["-h", "--help"],
        "max_content_width": 100,
        # Everything from the command on is the command's, even words that look like our options.
        "allow_interspersed_args": False,
    },
)
@click.option("--url", envvar="BROKER_URL", required=True, help="Broker base URL (default: $BROKER_URL).")
@click.option(
    "--token-source",
    type=click.Choice(SOURCE_NAMES),
    help="Where the workload token comes from (default: the first one found, in this order).",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False),
    help="Token file, re-read for every request (k8s projected token, spiffe-helper JWT-SVID).",
)
@click.option(
    "--audience", default=DEFAULT_AUDIENCE, show_default=True, help="Audience to ask SPIFFE/GitHub for."
)
@click.option("--task", "task_type", required=True, help="Task type to start.")
@click.option("--owner", required=True, help="The person or team accountable for this task.")
@click.option(
    "--purpose", required=True, help="Why (8 to 500 characters; approvers and the audit log see it)."
)
@click.option("--context", "context", multiple=True, metavar="KEY=VALUE", help="Request context; repeatable.")
@click.option("--ttl", type=click.IntRange(min=1), metavar="S", help="Task lifetime in seconds.")
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Wait this long for an approval (default: don't wait; a task needing one is withdrawn).",
)
@click.option(
    "--env",
    "env_templates",
    multiple=True,
    metavar="NAME=TEMPLATE",
    help="Extra variable built from others, e.g. 'URL=postgresql://{DB_USERNAME}:{DB_PASSWORD}@h/db'.",
)
@click.option(
    "--env-file",
    type=click.Path(dir_okay=False),
    help="Also write the variables to this new file (mode 0600, shell syntax), removed afterwards.",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- COMMAND [ARGS]...")
def exec_command(
    url: str,
    token_source: str | None,
    token_file: str | None,
    audience: str,
    task_type: str,
    owner: str,
    purpose: str,
    context: tuple[str, ...],
    ttl: int | None,
    wait: float | None,
    env_templates: tuple[str, ...],
    env_file: str | None,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND with a task's credentials in its environment; finish the task when it ends."""
    try:
        tokens = resolve_token_source(token_source, token_file=token_file, audience=audience)
    except TokenSourceError as error:
        click.echo(f"broker exec: {error}", err=True)
        sys.exit(WRAPPER_FAILED)
    status = run(
        BrokerClient(url, tokens),
        task=task_type,
        owner=owner,
        purpose=purpose,
        context=_pairs(context, "--context") or None,
        ttl=ttl,
        wait=wait,
        env_templates=list(env_templates),
        env_file=env_file,
        command=list(command),
    )
    sys.exit(status)


if __name__ == "__main__":
    exec_command(prog_name="broker exec")
