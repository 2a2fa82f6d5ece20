"""`broker mcp`: serve the MCP tools over stdio (default) or streamable HTTP (`--http`).

Whatever way it ends (the client closes stdin, SIGTERM, SIGINT or SIGHUP), the server
kills the commands it is running and finishes, as `cancelled`, every task it started and
did not finish, so no credential outlives the agent's session by more than that.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import sys
from types import FrameType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import click

from broker.client import BrokerClient
from broker.client.errors import TokenSourceError
from broker.client.tokens import DEFAULT_AUDIENCE, SOURCE_NAMES, resolve_token_source
from broker.mcp.keeper import TaskKeeper

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer

log = logging.getLogger("broker.mcp")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _loopback_host_port(
    _context: click.Context, _param: click.Parameter, value: str | None
) -> tuple[str, int] | None:
    if value is None:
        return None
    host, _, port = value.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter("expected HOST:PORT, e.g. 127.0.0.1:8765")
    # The endpoint has no authentication of its own and runs commands with the credentials:
    # only processes on this machine may reach it.
    if host != "localhost" and not _is_loopback(host):
        raise click.BadParameter(f"{host} is not a loopback address; bind to 127.0.0.1, ::1 or localhost")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command("mcp")
@click.option("--url", envvar="BROKER_URL", required=True, help="The broker's URL (default: $BROKER_URL).")
@click.option(
    "--token-source",
    type=click.Choice(SOURCE_NAMES),
    help="Where the workload token comes from (default: --token-file if given, else $BROKER_WORKLOAD_TOKEN, "
    "else SPIFFE, GitHub or GitLab when present).",
)
@click.option("--token-file", type=click.Path(dir_okay=False), help="A file holding the token.")
@click.option("--audience", default=DEFAULT_AUDIENCE, show_default=True, help="Audience for minted tokens.")
@click.option(
    "--http",
    "http",
    callback=_loopback_host_port,
    metavar="HOST:PORT",
    help="Serve streamable HTTP at http://HOST:PORT/mcp (loopback only) instead of stdio.",
)
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), default="INFO")
def mcp_command(
    url: str,
    token_source: str | None,
    token_file: str | None,
    audience: str,
    http: tuple[str, int] | None,
    log_level: str,
) -> None:
    """Serve the broker's task tools to an MCP client, acting as one workload.

    \b
    Example:
      broker mcp --url https://broker.example.org --token-file /var/run/secrets/broker/token
      broker mcp --url http://127.0.0.1:8080 --http 127.0.0.1:8765
    """
    # stderr only: over stdio, stdout is the protocol.
    logging.basicConfig(
        stream=sys.stderr, level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        tokens = resolve_token_source(token_source, token_file=token_file, audience=audience)
        tokens.get()  # fail now, not at the first tool call
    except TokenSourceError as error:
        raise click.ClickException(str(error)) from None
    try:
        # Imported here, not at the top: `broker` must start without the optional `mcp` extra.
        from broker.mcp.server import build_server
    except ImportError:
        needs = "broker mcp needs the mcp extra: pip install 'credential-broker[mcp]'"
        raise click.ClickException(needs) from None
    keeper = TaskKeeper(BrokerClient(url, tokens))
    server = build_server(keeper)
    transport = "over stdio" if http is None else "over HTTP"
    log.info("serving %s as one workload (pid %d)", transport, os.getpid())
    if http is None:
        _serve_stdio(server, keeper)
    else:
        _serve_http(server, keeper, *http)


def _serve_stdio(server: MCPServer[Any], keeper: TaskKeeper) -> None:
    async def main() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(_stop_on_signal, keeper)
            await server.run_stdio_async()
            log.info("the client closed the connection")
            # Still inside the signal receiver: a SIGTERM now (clients send one after a
            # short grace) waits for this shutdown instead of killing it halfway.
            await anyio.to_thread.run_sync(keeper.shutdown)
            group.cancel_scope.cancel()

    try:
        anyio.run(main)
    finally:
        keeper.shutdown()


async def _stop_on_signal(keeper: TaskKeeper) -> None:
    with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async for signum in signals:
            log.info("stopping on %s", signal.Signals(signum).name)
            await anyio.to_thread.run_sync(keeper.shutdown)
            logging.shutdown()
            # The SDK's stdin reader sits in a thread blocked on a read that no cancellation
            # interrupts; with every task finished there is nothing left to wait for.
            os._exit(0)


def _serve_http(server: MCPServer[Any], keeper: TaskKeeper, host: str, port: int) -> None:
    import uvicorn

    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Stop running commands now: uvicorn's graceful shutdown waits for open requests.
            keeper.stopping.set()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(server.streamable_http_app(host=host), host=host, port=port, log_level="info")
    web = Uvicorn(config)
    signal.signal(signal.SIGHUP, lambda signum, frame: web.handle_exit(signal.SIGTERM, frame))
    try:
        web.run()
    finally:
        keeper.shutdown()
