"""The docs held to the code: what docs/security.md's known limitations and docs/api.md say
is checked against what the broker does, so a fixed limitation can't stay documented as a
limitation (issue 30 found two that had) and a new problem code can't go undocumented."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from broker.api import problems
from broker.api.openapi import document
from broker.approvals import notify
from broker.config import NotifySettings
from tests.factories import AGENT, start_body

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _section(doc: str, heading: str) -> str:
    """From `heading` to the next heading of the same or a higher level."""
    text = (DOCS / doc).read_text()
    start = text.index(heading)
    body = start + len(heading)
    level = len(heading.split(" ", maxsplit=1)[0])
    end = re.search(rf"^#{{1,{level}}} ", text[body:], re.M)
    return text[start : body + end.start()] if end else text[start:]


def _limitations() -> str:
    # Joined into one line per paragraph: the claims below may wrap anywhere.
    return " ".join(_section("security.md", "## Known limitations").split())


def test_the_limitations_claim_no_gap_the_code_has_closed() -> None:
    limitations = _limitations()
    assert "Idempotency-Key" in limitations  # the section was read
    for fixed in (
        "No idempotency key",
        "starts a second task",
        "webhook is not retried",
        "is not retried and",
    ):
        assert fixed not in limitations, fixed


def test_the_documented_idempotency_key_is_the_header_the_api_reads() -> None:
    api = (DOCS / "api.md").read_text()
    assert "`Idempotency-Key`" in api and "### Idempotent starts" in api
    start = document()["paths"]["/task/start"]["post"]
    assert [p["name"] for p in start["parameters"] if p["in"] == "header"] == ["Idempotency-Key"]


def test_the_documented_notification_retries_are_the_ones_the_code_makes() -> None:
    limitations = _limitations()
    for setting in re.findall(r"`notify\.([a-z_]+)`", limitations):
        assert setting in NotifySettings.model_fields, setting
    assert {"retries", "retry_base_seconds"} <= set(re.findall(r"`notify\.([a-z_]+)`", limitations))
    documented = re.search(r"no answer, a ((?:\d{3}, )*\d{3}) or 5xx is tried again", limitations)
    assert documented, "the retried statuses are named"
    below_500 = {int(status) for status in documented.group(1).split(", ")}
    assert {status for status in notify._RETRYABLE if status < 500} == below_500
    assert all(500 <= status < 600 for status in notify._RETRYABLE - below_500)


def test_the_problem_code_table_lists_exactly_the_codes_the_broker_answers() -> None:
    table = _section("api.md", "### All error codes")
    documented = set(re.findall(r"^\| (?:\d{3}|other) \| `([a-z_]+)` \|", table, re.M))  # not the header
    answered = (
        {row.code for row in problems.PROBLEMS.values()}
        | {row.code for row in problems._HTTP_ROWS.values()}
        | {code for code, _, _ in problems._SERVER_REFUSALS.values()}
        # Answered by literal: an unexpected error, an unknown HTTP error, and /readyz.
        | {"internal_error", "http_error", "not_ready"}
    )
    assert documented == answered


def test_the_pending_listing_answers_the_fields_docs_api_md_names(client: Any, issuers: Any) -> None:
    body = start_body("deploy-prod", context={"environment": "prod"})
    started = client.post("/task/start", json=body, headers=issuers["spire"].bearer(AGENT))
    assert started.status_code == 202, started.get_json()
    task = client.get(f"/task/{started.get_json()['task_id']}", headers=issuers["spire"].bearer(AGENT))
    sub = "dba-dana@example.com"
    approver = issuers["sso"].bearer(sub, groups=["dba"], extra_claims={"email": sub})
    [item] = client.get("/approvals?state=pending", headers=approver).get_json()["items"]
    beyond_a_task = set(item) - set(task.get_json())
    section = _section("api.md", "### `GET /approvals?state=pending`")
    assert beyond_a_task == {"would_issue", "approvers"}
    for field in beyond_a_task:
        assert f"`{field}`" in section, field
    assert "leases" not in item  # as documented: tasks without their leases
