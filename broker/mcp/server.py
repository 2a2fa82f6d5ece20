"""The MCP server: five tools over one workload's broker client (docs/mcp.md).

Built on the official SDK's `MCPServer` (FastMCP, renamed in mcp 2) rather than the
low-level `Server`: each tool is a typed function, and the SDK derives the JSON input
schema that clients see from the same annotations (with their `Field` limits and
descriptions), so the documented schema and the validation can't drift apart. Nothing here
needs the low-level server's control over the protocol. Tools are plain functions: the SDK
runs them in worker threads, where the blocking broker client belongs.

Errors: a refusal of the broker comes back as a tool error `<code>: <detail>` (the problem's
stable code and its sentence), one of this server as `<code>: <detail>` too; anything
unexpected as `internal_error` with no exception text, whose type alone is logged. Every
message is passed through the redactor of every secret the server holds, in case.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Annotated, Any, Literal, ParamSpec, TypeVar

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from broker import __version__
from broker.client.errors import BrokerAPIError, BrokerError
from broker.mcp.keeper import KeeperError, TaskKeeper
from broker.mcp.process import CommandNotStarted

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

MAX_COMMAND_TIMEOUT = 3600
INSTRUCTIONS = """\
Short-lived credentials for one task at a time, from the Credential Broker.
1. list_task_types: what this workload may start (credential names and kinds, TTLs, approval).
2. start_task: start one, naming the accountable human (owner) and why (purpose).
   If it needs approval, tell the human the approver groups and the console link, then
   call task_status until it is active.
3. run_with_credentials: run a command (no shell) with the credentials in its environment
   as <NAME>_<FIELD> variables (DB_USERNAME, DB_PASSWORD, ...). You never see the values:
   they are redacted from the output.
4. finish_task as soon as the work is done: that revokes the credentials.
No tool approves anything."""


def _tool_errors(keeper: TaskKeeper) -> Callable[[Callable[P, R]], Callable[P, R]]:
    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(function)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return function(*args, **kwargs)
            except BrokerAPIError as error:
                rule = f" (rule {error.rule})" if error.rule else ""
                message = f"{error.code}: {error.detail}{rule}"
            except KeeperError as error:
                message = f"{error.code}: {error.detail}"
            except CommandNotStarted as error:
                message = f"command_not_started: {error}"
            except BrokerError as error:
                # Unreachable broker or no token: the text names the URL or file, no secret.
                message = f"broker_unavailable: {error}"
            except Exception as error:
                log.error("tool %s failed unexpectedly: %s", function.__name__, type(error).__name__)
                message = "internal_error: the MCP server failed; see its log"
            raise ToolError(keeper.redactor()(message)) from None

        return wrapper

    return decorate


def build_server(keeper: TaskKeeper) -> MCPServer[Any]:
    server: MCPServer[Any] = MCPServer(
        "credential-broker", version=__version__, instructions=INSTRUCTIONS, log_level="INFO"
    )
    guarded = _tool_errors(keeper)

    @server.tool()
    @guarded
    def list_task_types() -> dict[str, Any]:
        """The task types this workload may start: name, description, TTLs (seconds), whether
        approval is `always`, `conditional` or `never` needed (and by which groups), and the
        credential names and kinds each one gives."""
        return {"items": keeper.task_types()}

    @server.tool()
    @guarded
    def start_task(
        task: Annotated[str, Field(min_length=1, max_length=64, description="A task type name")],
        owner: Annotated[
            str, Field(min_length=1, max_length=200, description="The human or team accountable (an email)")
        ],
        purpose: Annotated[
            str, Field(min_length=8, max_length=500, description="Why; shown to approvers and audited")
        ],
        context: Annotated[
            dict[str, Any] | None, Field(description="Facts the policy may check, e.g. {environment: prod}")
        ] = None,
        ttl_seconds: Annotated[
            int | None, Field(gt=0, description="Lifetime; default the task type's, at most its max")
        ] = None,
    ) -> dict[str, Any]:
        """Start a task. Answers its id, state, deadline and credential names and kinds, never
        a value. State `pending_approval` means a human must approve first: tell them the
        approver groups and console link, then poll task_status."""
        return keeper.start(task, owner, purpose, context, ttl_seconds)

    @server.tool()
    @guarded
    def task_status(
        task_id: Annotated[str, Field(description="The task_id from start_task")],
    ) -> dict[str, Any]:
        """A task's state, deadline, credentials (names, kinds, states) and approval. When an
        approval has been granted, this server claims the credentials and the state becomes
        `active`."""
        return keeper.status(task_id)

    @server.tool()
    @guarded
    def run_with_credentials(
        task_id: Annotated[str, Field(description="An active task this server started")],
        command: Annotated[
            list[str], Field(min_length=1, description='Program and arguments, no shell: ["psql", "-c", "x"]')
        ],
        cwd: Annotated[str | None, Field(description="Working directory (default: the server's)")] = None,
        timeout_seconds: Annotated[
            int, Field(gt=0, le=MAX_COMMAND_TIMEOUT, description="Kill the command after this long")
        ] = 300,
    ) -> dict[str, Any]:
        """Run a command with the task's credentials in its environment (<NAME>_<FIELD>, plus
        BROKER_TASK_ID and BROKER_TASK_EXPIRES_AT). Answers the exit status and up to 64 KiB of
        stdout and stderr each, with every secret value (raw, base64, hex, percent-encoded)
        replaced by [REDACTED:<credential name>]."""
        result = keeper.run(task_id, command, cwd, timeout_seconds)
        return {
            "exit_status": result.exit_status,
            "timed_out": result.timed_out,
            "stopped": result.stopped,
            "stdout": result.stdout,
            "stderr": result.stderr,
            "stdout_truncated": result.stdout_truncated,
            "stderr_truncated": result.stderr_truncated,
        }

    @server.tool()
    @guarded
    def finish_task(
        task_id: Annotated[str, Field(description="The task to end")],
        outcome: Annotated[
            Literal["succeeded", "failed", "cancelled"], Field(description="Recorded in the audit log")
        ] = "succeeded",
    ) -> dict[str, Any]:
        """End a task: the broker revokes every credential before answering, and this server
        forgets them."""
        return keeper.finish(task_id, outcome)

    return server
