"""Hostile workload strings are shown as text on every view that shows them, and never run.

Each payload would set `window.__xss` and call `console.error("xss-fired-...")` if it were
parsed as markup. Two layers are checked at once: the scripts insert text only (the payload
is visible literally and no element came of it), and had one slipped, the CSP would have
blocked it (a CSP violation message would then show up, which also fails the test).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import requests

from tests.console.conftest import Watched, sign_in

IMG = "<img src=x onerror=\"window.__xss='img';console.error('xss-fired-img')\">"
SCRIPT = "<script>window.__xss='script';console.error('xss-fired-script')</script>"
SVG = "\"><svg onload=\"window.__xss='svg';console.error('xss-fired-svg')\">"
OWNER = "<img src=x onerror=window.__xss='owner'>@example.com"


def hostile_context(environment: str) -> dict[str, Any]:
    return {
        "environment": environment,
        "note": SCRIPT,
        IMG: "a key that is markup",
        "nested": {"deep": SVG, "list": [IMG, SCRIPT]},
    }


def assert_shown_literally_and_inert(watched: Watched, *texts: str) -> None:
    page = watched.page
    shown = page.locator("main").inner_text()
    for text in texts:
        assert text in shown, f"not shown literally: {text}"
    assert page.locator("main img, main svg, main script, main iframe").count() == 0
    assert page.evaluate("window.__xss") is None
    fired = [text for _, text in watched.messages if "xss-fired" in text]
    assert not fired, fired
    assert not watched.csp_violations(), watched.csp_violations()
    assert not watched.errors, watched.errors


def test_hostile_strings_stay_text_for_operators(watched, live_server, api, operator_token, tmp_path: Path):
    task = api.start(owner=OWNER, purpose=f"report {IMG}", context=hostile_context("staging"))
    lease = task["leases"][0]
    # A hostile revoke reason on a second task, to show it in the lease and audit views too.
    other = api.start(purpose=f"index {SVG}", context=hostile_context("dev"))
    revoked = requests.post(
        f"{live_server}/leases/{other['leases'][0]['id']}/revoke",
        json={"reason": f"because {SCRIPT}"},
        headers=api.operator(),
        timeout=30,
    )
    assert revoked.status_code == 200, revoked.text

    page = sign_in(watched, live_server, operator_token, "/console/leases")
    page.get_by_role("region", name=f"Owner {OWNER}").wait_for()
    assert_shown_literally_and_inert(watched, OWNER, f"report {IMG}")
    page.screenshot(path=str(tmp_path / "leases.png"), full_page=True)

    page.goto(f"{live_server}/console/tasks/{task['task_id']}")
    page.get_by_role("table", name="Context of this task").wait_for()
    page.get_by_role("table", name="Audit events, newest first").wait_for()
    assert_shown_literally_and_inert(watched, OWNER, f"report {IMG}", SCRIPT, IMG, "a key that is markup")
    # Nested values are shown as JSON, so the quotes in this one come escaped.
    assert json.dumps(SVG) in page.get_by_role("table", name="Context of this task").inner_text()
    page.screenshot(path=str(tmp_path / "task.png"), full_page=True)

    page.goto(f"{live_server}/console/leases/{lease['id']}")
    page.locator("#lease-fields dd").first.wait_for()
    assert_shown_literally_and_inert(watched, OWNER, f"report {IMG}")

    page.goto(f"{live_server}/console/leases/{other['leases'][0]['id']}")
    page.get_by_text(f"because {SCRIPT}").wait_for()
    assert_shown_literally_and_inert(watched, f"index {SVG}")

    page.goto(f"{live_server}/console/audit")
    page.get_by_role("table", name="Audit events, newest first").wait_for()
    assert_shown_literally_and_inert(watched, OWNER, f"report {IMG}", f"index {SVG}", f"because {SCRIPT}")

    # The kill switch form takes the hostile owner from the link and shows it in the dialog.
    page.goto(f"{live_server}/console/leases")
    page.get_by_role("link", name="Kill switch for this owner…").click()
    page.get_by_role("button", name="Review…").click()
    page.get_by_role("dialog").get_by_text(OWNER).wait_for()
    assert page.get_by_label("Owner").input_value() == OWNER
    assert_shown_literally_and_inert(watched)


def test_hostile_strings_stay_text_for_approvers(watched, live_server, api, approver_token, tmp_path: Path):
    task = api.start(
        "deploy-prod", status=202, owner=OWNER, purpose=f"deploy {SVG}", context=hostile_context("prod")
    )
    page = sign_in(watched, live_server, approver_token, "/console/approvals")
    page.get_by_role("article").first.wait_for()
    assert_shown_literally_and_inert(watched, OWNER, f"deploy {SVG}", SCRIPT, IMG)
    page.screenshot(path=str(tmp_path / "approvals.png"), full_page=True)

    page.goto(f"{live_server}/console/approvals/{task['task_id']}")
    page.get_by_role("table", name="Context of this request").wait_for()
    assert_shown_literally_and_inert(watched, OWNER, f"deploy {SVG}", SCRIPT, IMG)

    page.get_by_role("button", name="Deny…").click()
    dialog = page.get_by_role("dialog")
    assert OWNER in dialog.inner_text() and f"deploy {SVG}" in dialog.inner_text()
    dialog.get_by_label("Reason").fill(f"no {IMG}")
    dialog.get_by_role("button", name="Deny").click()
    page.get_by_text("This request is now denied.").wait_for()
    assert_shown_literally_and_inert(watched, f"no {IMG}")


def test_the_browser_enforces_the_policy(watched, live_server, operator_token):
    """Even script the page itself inserted inline would not run: the CSP is live."""
    page = sign_in(watched, live_server, operator_token, "/console/leases")
    page.evaluate(
        """() => {
            const script = document.createElement("script");
            script.textContent = "window.__inline = 1";
            document.body.append(script);
            const div = document.createElement("div");
            div.setAttribute("onclick", "window.__inline = 2");
            document.body.append(div);
            div.click();
        }"""
    )
    page.wait_for_timeout(200)
    assert page.evaluate("window.__inline") is None
    assert len(watched.csp_violations()) >= 2
