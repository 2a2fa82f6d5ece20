"""An operator in a real browser: sees active leases, revokes one, runs the kill switch."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from tests.console.conftest import sign_in
from tests.factories import AGENT, can_log_in, role_exists
from tests.support.waiting import wait_for

OTHER = "spiffe://example.org/agents/builder"


def dead(stack: Any, creds: dict[str, Any]) -> bool:
    # The database user is gone (not merely refused: mid-revocation it exists without grants).
    return not role_exists(stack, creds["username"])


def test_operator_sees_an_active_lease_and_revokes_it(
    watched, live_server, api, operator_token, stack, tmp_path: Path
):
    task = api.start(owner="alice@example.com", purpose="weekly revenue report")
    lease = task["leases"][0]
    page = sign_in(watched, live_server, operator_token)

    page.wait_for_url("**/console/leases")
    group = page.get_by_role("region", name="Owner alice@example.com")
    row = group.get_by_role("row").filter(has_text="weekly revenue report")
    row.wait_for()
    assert "analytics-read" in row.inner_text()
    assert page.get_by_role("navigation", name="Console views").get_by_role("link", name="Audit").is_visible()
    page.screenshot(path=str(tmp_path / "leases.png"), full_page=True)

    row.get_by_role("button", name="Revoke lease db").click()
    dialog = page.get_by_role("dialog", name="Revoke this lease?")
    assert dialog.is_visible()
    dialog.get_by_role("button", name="Revoke lease").click()  # no reason yet: refused
    assert dialog.get_by_role("alert").inner_text().startswith("Give a reason")
    dialog.get_by_label("Reason").fill("INC-1234 suspicious queries")
    page.screenshot(path=str(tmp_path / "revoke-dialog.png"))
    dialog.get_by_role("button", name="Revoke lease").click()
    page.get_by_role("status").filter(has_text="is revoked").wait_for()
    page.get_by_text("No active leases.").wait_for()

    after = api.get(f"/leases/{lease['id']}")
    assert after["state"] == "revoked"
    assert after["revoke_reason"].endswith("INC-1234 suspicious queries")
    assert not can_log_in(stack, task["credentials"]["db"]["data"])
    assert not watched.errors and not watched.csp_violations()


def test_cancel_leaves_the_lease_alone(watched, live_server, api, operator_token):
    task = api.start()
    page = sign_in(watched, live_server, operator_token, f"/console/leases/{task['leases'][0]['id']}")
    page.get_by_role("button", name="Revoke this lease…").click()
    page.get_by_role("dialog").get_by_label("Reason").fill("changed my mind")
    page.get_by_role("button", name="Cancel").click()
    assert not page.get_by_role("dialog").is_visible()
    assert api.get(f"/leases/{task['leases'][0]['id']}")["state"] == "active"


def test_leases_group_by_workload_and_refresh_on_their_own(watched, live_server, api, operator_token):
    api.start(owner="alice@example.com")
    page = sign_in(watched, live_server, operator_token, "/console/leases")
    page.get_by_role("region", name="Owner alice@example.com").wait_for()
    api.start(sub=OTHER, owner="bob@example.com", purpose="builds the nightly index")
    # No reload: the page asks again every few seconds.
    page.get_by_role("region", name="Owner bob@example.com").wait_for(timeout=15_000)
    page.get_by_label("Workload").check()
    page.get_by_role("region", name=f"Workload {AGENT}").wait_for()
    page.get_by_role("region", name=f"Workload {OTHER}").wait_for()
    assert page.locator(".time-left").first.inner_text().endswith(("m", "s"))


def test_task_detail_shows_the_task_its_leases_and_its_audit(watched, live_server, api, operator_token):
    task = api.start(context={"environment": "staging", "ticket": "OPS-7"})
    page = sign_in(watched, live_server, operator_token, f"/console/tasks/{task['task_id']}")
    page.get_by_role("table", name="Context of this task").get_by_text("OPS-7").wait_for()
    assert page.get_by_role("table", name="Leases of this task").get_by_role("link", name="db").is_visible()
    page.get_by_role("table", name="Audit events, newest first").get_by_text("task.started").wait_for()


def test_kill_switch_by_workload_with_confirmation(
    watched, live_server, api, operator_token, stack, tmp_path: Path, running_scheduler
):
    mine = [api.start(), api.start(owner="bob@example.com")]
    theirs = api.start(sub=OTHER)
    page = sign_in(watched, live_server, operator_token, "/console/kill-switch")
    page.get_by_label("Workload").fill(AGENT)
    page.get_by_role("button", name="Review…").click()
    dialog = page.get_by_role("dialog", name="Run the kill switch?")
    dialog.get_by_text("This ends 2 open tasks matching now and revokes 2 active leases").wait_for()
    dialog.get_by_label("Reason").fill("agent compromised, INC-1234")
    page.screenshot(path=str(tmp_path / "kill-switch.png"))
    dialog.get_by_role("button", name="End these tasks").click()
    page.get_by_role("region", name="Result").wait_for()
    links = page.get_by_role("region", name="Result").get_by_role("link")
    assert sorted(links.all_inner_texts()) == sorted(task["task_id"] for task in mine)

    for task in mine:
        assert api.get(f"/task/{task['task_id']}")["state"] == "revoked"
        # The scheduler revokes what the kill switch ended, right after its answer.
        wait_for(partial(dead, stack, task["credentials"]["db"]["data"]), what="revoked")
    assert api.get(f"/task/{theirs['task_id']}")["state"] == "active"
    events = api.get("/audit?event=operator.kill_switch")["items"]
    assert [event["purpose"] for event in events] == ["agent compromised, INC-1234"]


def test_kill_switch_needs_a_filter(watched, live_server, operator_token):
    page = sign_in(watched, live_server, operator_token, "/console/kill-switch")
    page.get_by_role("button", name="Review…").click()
    assert page.get_by_role("alert").inner_text().startswith("Fill in at least one")
    assert not page.get_by_role("dialog").is_visible()


def test_audit_filters(watched, live_server, api, operator_token):
    from playwright.sync_api import expect

    first, second = api.start(), api.start(owner="bob@example.com")
    page = sign_in(watched, live_server, operator_token, "/console/audit")
    table = page.get_by_role("table", name="Audit events, newest first")
    table.get_by_text("bob@example.com").first.wait_for()
    page.get_by_label("Task id").fill(first["task_id"])
    page.get_by_label("Event").select_option("lease.issued")
    page.get_by_role("button", name="Apply filters").click()
    page.wait_for_url("**event=lease.issued*")
    # Not wait_for_function: its string is eval'd in the page, which the console's CSP forbids.
    expect(page.locator("#audit-table tbody tr")).to_have_count(1)
    assert "alice@example.com" in table.inner_text()
    assert second["task_id"][:8] not in table.inner_text()
    page.get_by_label("Task id").fill("not a uuid")
    page.get_by_role("button", name="Apply filters").click()
    assert page.get_by_role("alert").inner_text() == "Task id must be a UUID."


def test_sign_out_forgets_the_token(watched, live_server, operator_token):
    page = sign_in(watched, live_server, operator_token, "/console/leases")
    assert page.evaluate("Object.values(sessionStorage)") == [operator_token]
    assert page.context.cookies() == []
    assert operator_token not in page.url
    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("Bearer token").wait_for()
    assert page.evaluate("sessionStorage.length") == 0


def test_a_refused_token_goes_back_to_sign_in(watched, live_server, issuers):
    expired = issuers["sso"].mint("sre-sam@example.com", groups=["sre"], exp_in=-120)
    page = watched.page
    page.goto(f"{live_server}/console/")
    page.get_by_label("Bearer token").fill(expired)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("alert").filter(has_text="The broker refused the token").wait_for()
    assert page.evaluate("sessionStorage.length") == 0


def test_a_workload_token_is_turned_away(watched, live_server, issuers):
    page = watched.page
    page.goto(f"{live_server}/console/")
    page.get_by_label("Bearer token").fill(issuers["spire"].mint(AGENT))
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("alert").filter(has_text="neither as an operator nor as an approver").wait_for()
