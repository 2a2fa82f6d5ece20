"""The console against the real stack: a real HTTP server in a thread, a real headless Chromium.

The broker app is the one `tests/conftest.py` builds (real OpenBao, real Postgres, the test
policy), served by werkzeug's threaded server on a free port, because a browser needs real
HTTP. Chromium is the system's (`apt-get install chromium` on Debian); Playwright only
drives it, so `playwright install` and its downloads are never needed. Without either, the
browser tests skip and say why.

A failing browser test leaves a screenshot in its tmp_path and prints where.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from werkzeug.serving import make_server

from tests.factories import AGENT, start_body

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
OPERATOR = "sre-sam@example.com"
APPROVER = "dba-dana@example.com"


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    # Fixtures read this at teardown, to know whether to keep a screenshot.
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def live_server(app: Any) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="console-live-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


# Per module, not per session: Playwright's sync API keeps an asyncio loop running in the
# main thread while it is open, and later tests (the MCP client's anyio.run) need that
# thread free.
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the console's browser tests need `pip install playwright`"
    )
    executable = chromium_path()
    if executable is None:
        pytest.skip("the console's browser tests need Chromium: `apt-get install -y chromium`")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@dataclass
class Watched:
    """A page and everything it said: console messages and uncaught errors."""

    page: Any
    messages: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def csp_violations(self) -> list[str]:
        return [text for _, text in self.messages if "Content Security Policy" in text]


@pytest.fixture
def watched(browser: Any, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    context.set_default_timeout(15_000)
    page = context.new_page()
    seen = Watched(page)
    page.on("console", lambda message: seen.messages.append((message.type, message.text)))
    page.on("pageerror", lambda error: seen.errors.append(str(error)))
    try:
        yield seen
    finally:
        failed = any(
            getattr(getattr(request.node, f"report_{when}", None), "failed", False)
            for when in ("setup", "call")
        )
        if failed:
            shot = tmp_path / "failure.png"
            try:
                page.screenshot(path=str(shot), full_page=True)
                print(f"\nconsole screenshot: {shot}")
            except Exception as error:  # a screenshot must not hide the real failure
                print(f"\nconsole screenshot failed: {error}")
        context.close()


@pytest.fixture
def operator_token(issuers: Any) -> str:
    return str(issuers["sso"].mint(OPERATOR, groups=["sre"], extra_claims={"email": OPERATOR}))


@pytest.fixture
def approver_token(issuers: Any) -> str:
    return str(issuers["sso"].mint(APPROVER, groups=["dba"], extra_claims={"email": APPROVER}))


class Api:
    """The JSON API over real HTTP, as a workload or an operator would call it."""

    def __init__(self, url: str, issuers: Any) -> None:
        self.url = url
        self.issuers = issuers

    def workload(self, sub: str = AGENT) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.issuers['spire'].mint(sub)}"}

    def operator(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.issuers['sso'].mint(OPERATOR, groups=['sre'])}"}

    def start(
        self, task: str = "analytics-read", sub: str = AGENT, status: int = 201, **overrides: Any
    ) -> Any:
        response = requests.post(
            f"{self.url}/task/start",
            json=start_body(task, **overrides),
            headers=self.workload(sub),
            timeout=30,
        )
        assert response.status_code == status, response.text
        return response.json()

    def get(self, path: str) -> Any:
        response = requests.get(f"{self.url}{path}", headers=self.operator(), timeout=30)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture
def api(live_server: str, issuers: Any) -> Api:
    return Api(live_server, issuers)


def sign_in(watched: Watched, url: str, token: str, path: str = "/console/") -> Any:
    page = watched.page
    page.goto(f"{url}{path}")
    page.get_by_label("Bearer token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.locator("#whoami").wait_for(state="visible")
    return page
