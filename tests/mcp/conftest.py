"""`broker mcp` driven by the MCP SDK's own stdio client, against a real `broker serve`.

One `broker serve` (with its scheduler) per module, on the session's OpenBao and Postgres.
Each test acts as a workload of its own (a fresh SPIFFE ID), so the policy's per-workload
limits never couple tests, and the ledger needs no truncating between them.
"""

from __future__ import annotations

import shutil
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from tests.conftest import ROOT, TEST_POLICY, broker_config
from tests.support.broker_procs import BrokerProcess


@pytest.fixture(scope="module")
def broker(stack: Any, issuers: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    directory = tmp_path_factory.mktemp("mcp-broker")
    policy = directory / "policy.yaml"
    shutil.copy(TEST_POLICY, policy)
    config = directory / "broker.yaml"
    config.write_text(yaml.safe_dump(broker_config(stack, issuers, policy)))
    process = BrokerProcess.serve(config, directory / "serve.log", workers=1, threads=4)
    try:
        process.wait_healthy()
        yield process
    finally:
        process.stop()


@dataclass
class Workload:
    """One agent identity: its token file, and direct API calls for the test's own checks."""

    url: str
    subject: str
    token: str
    token_file: Path

    def get(self, task_id: str) -> dict[str, Any]:
        answer = requests.get(f"{self.url}/task/{task_id}", headers=self.headers, timeout=10)
        answer.raise_for_status()
        return dict(answer.json())

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture
def workload(broker: BrokerProcess, issuers: Any, tmp_path: Path) -> Workload:
    subject = issuers["spire"].spiffe_id(f"agents/mcp-{uuid.uuid4().hex[:8]}")
    token = issuers["spire"].mint(subject, exp_in=3600)
    token_file = tmp_path / "workload.jwt"
    token_file.write_text(token)
    return Workload(broker.url, subject, token, token_file)


@dataclass
class McpRun:
    """A `python -m broker.mcp` over stdio: its session, its stderr, and every result seen."""

    session: ClientSession
    errlog: Path
    results: list[Any] = field(default_factory=list)

    async def call(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        result = await self.session.call_tool(name, arguments or {})
        self.results.append(result)
        return result

    async def ok(self, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        result = await self.call(name, arguments)
        assert not result.is_error, result.content
        return dict(result.structured_content)

    def log(self) -> str:
        return self.errlog.read_text(errors="replace")

    def pid(self) -> int:
        for line in self.log().splitlines():
            if "as one workload (pid " in line:
                return int(line.rsplit("(pid ", 1)[1].rstrip(")"))
        raise AssertionError(f"no pid in the server's log:\n{self.log()}")


@asynccontextmanager
async def mcp_server(workload: Workload, errlog: Path, *extra_args: str) -> AsyncIterator[McpRun]:
    parameters = StdioServerParameters(
        command=sys.executable,
        args=[
            "-m",
            "broker.mcp",
            "--url",
            workload.url,
            "--token-file",
            str(workload.token_file),
            *extra_args,
        ],
        cwd=str(ROOT),
        env={"PYTHONUNBUFFERED": "1"},
    )
    with errlog.open("w") as log:
        async with (
            stdio_client(parameters, errlog=log) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            yield McpRun(session, errlog)
