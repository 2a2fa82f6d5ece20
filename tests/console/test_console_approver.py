"""An approver in a real browser: sees only approvals, reads the request, decides with a reason."""

from __future__ import annotations

from pathlib import Path

from tests.console.conftest import APPROVER, sign_in

PROD = {"context": {"environment": "prod", "ticket": "CHG-42"}, "purpose": "release 1.4 to production"}


def test_an_approver_sees_only_approvals(watched, live_server, api, approver_token):
    api.start("deploy-prod", status=202, **PROD)
    page = sign_in(watched, live_server, approver_token)
    page.wait_for_url("**/console/approvals")
    nav = page.get_by_role("navigation", name="Console views")
    assert nav.get_by_role("link").all_inner_texts() == ["Approvals"]
    page.get_by_role("article").filter(has_text="release 1.4 to production").wait_for()
    assert page.get_by_role("heading", name="Active leases").count() == 0

    page.goto(f"{live_server}/console/leases")  # typed by hand: the API refuses, so does the page
    page.get_by_role("heading", name="Not for this token").wait_for()
    assert page.get_by_text("This view needs an operator token").is_visible()
    assert not watched.errors


def test_approve_from_a_direct_link_with_a_reason(watched, live_server, api, approver_token, tmp_path: Path):
    task = api.start("deploy-prod", status=202, **PROD)
    # What a notification links to; the approver signs in on that page.
    page = sign_in(watched, live_server, approver_token, f"/console/approvals/{task['task_id']}")
    page.get_by_role("table", name="Context of this request").get_by_text("CHG-42").wait_for()
    fields = page.locator("#approval-fields").inner_text()
    assert "deploy-prod" in fields and "alice@example.com" in fields and "release 1.4 to production" in fields
    assert "spiffe://example.org/agents/reporter" in fields
    assert "120 seconds" in page.locator("#approval-issue").inner_text()
    page.screenshot(path=str(tmp_path / "approval.png"), full_page=True)

    page.get_by_role("button", name="Approve…").click()
    dialog = page.get_by_role("dialog", name="Approve this request?")
    dialog.get_by_label("Reason").fill("change ticket CHG-42 reviewed")
    dialog.get_by_role("button", name="Approve").click()
    page.get_by_text("This request is now approved.").wait_for()
    assert not page.get_by_role("button", name="Approve…").is_visible()

    read = api.get(f"/task/{task['task_id']}")
    assert read["approval"]["state"] == "approved"
    [decision] = read["approval"]["decisions"]
    assert decision == {
        **decision,
        "approver": f"corp-sso:{APPROVER}",
        "decision": "approve",
        "reason": "change ticket CHG-42 reviewed",
    }


def test_deny_from_the_list(watched, live_server, api, approver_token):
    task = api.start("deploy-prod", status=202, **PROD)
    page = sign_in(watched, live_server, approver_token, "/console/approvals")
    page.get_by_role("button", name="Deny deploy-prod for alice@example.com").click()
    dialog = page.get_by_role("dialog", name="Deny this request?")
    dialog.get_by_label("Reason").fill("no change ticket for this window")
    dialog.get_by_role("button", name="Deny").click()
    page.get_by_text("Nothing is waiting for your decision.").wait_for()
    assert api.get(f"/task/{task['task_id']}")["state"] == "denied"


def test_a_decided_request_says_so(watched, live_server, api, approver_token):
    task = api.start("deploy-prod", status=202, **PROD)
    page = sign_in(watched, live_server, approver_token, f"/console/approvals/{task['task_id']}")
    page.get_by_role("button", name="Approve…").click()
    page.get_by_role("dialog").get_by_label("Reason").fill("ok")
    page.get_by_role("dialog").get_by_role("button", name="Approve").click()
    page.get_by_text("This request is now approved.").wait_for()
    page.reload()
    page.get_by_text("This request is not waiting for your decision").wait_for()
    assert page.locator("#approval-request").is_hidden()


def test_an_operator_sees_why_a_request_is_not_pending(watched, live_server, api, operator_token):
    task = api.start("deploy-prod", status=202, **PROD)
    page = sign_in(watched, live_server, operator_token, f"/console/approvals/{task['task_id']}")
    # sre-sam may approve in general but is not a DBA: nothing waits for him here.
    page.get_by_text("The task is pending_approval; its approval is pending.").wait_for()
    page.get_by_role("link", name="Open the task").click()
    page.wait_for_url(f"**/console/tasks/{task['task_id']}")
    page.get_by_role("table", name="Context of this task").get_by_text("CHG-42").wait_for()
