"""Issue 13: whatever numbers a workload puts in `context`, the audit chain stays verifiable
and an approved task stays claimable; numbers the broker can't keep exactly are refused.

Bodies are sent as raw JSON text, so every spelling (1E2, -0.0, 0.1e1, 2**70, 1e400, a
30-digit fraction) reaches the broker's parser as a client wrote it.
"""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.api.schemas import MAX_CONTEXT_DEPTH, _depth
from broker.canonical import MAX_EXACT_INTEGER
from broker.cli.main import main
from tests.audit.conftest import AUDIT_KEY, json_text, number_text, seal_all, verify
from tests.factories import AGENT

# One app and client for all examples of a test: the fixtures are built once per test.
EXAMPLES = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def body(task: str, environment: str, value_text: str) -> str:
    return (
        f'{{"task":"{task}","owner":"alice@example.com","purpose":"numbers from a workload",'
        f'"context":{{"environment":"{environment}","value":{value_text}}}}}'
    )


def post_raw(client, issuers, path, text):
    return client.post(
        path, data=text, content_type="application/json", headers=issuers["spire"].bearer(AGENT)
    )


def stored_context(client, issuers, started):
    """The context as the broker reads it back from Postgres."""
    task_id = started.get_json()["task_id"]
    return client.get(f"/task/{task_id}", headers=issuers["spire"].bearer(AGENT)).get_json()["context"]


def number_accepted(text: str) -> bool:
    """The rule of docs/api.md ("Numbers"), written from the spec, not from the parser."""
    exact = Decimal(text)
    if abs(exact) > MAX_EXACT_INTEGER:
        return False
    if not any(mark in text for mark in ".eE"):
        return True
    return Decimal(repr(float(text))) == exact


def numbers_in(text: str) -> list[str]:
    found: list[str] = []
    json.loads(text, parse_int=found.append, parse_float=found.append)
    return found


def same_numbers(sent_text: str, shown) -> bool:
    """Every number shown back has the value sent (1E2 and 100.0 alike), exactly."""
    as_sent = json.loads(sent_text, parse_float=Decimal, parse_int=Decimal)
    as_shown = json.loads(json.dumps(shown), parse_float=Decimal, parse_int=Decimal)
    return bool(as_sent == as_shown)


@EXAMPLES
@given(value=json_text)
def test_every_context_is_refused_cleanly_or_kept_verifiable(keyed, keyed_client, issuers, value):
    client = keyed_client
    expected = all(number_accepted(number) for number in numbers_in(value))
    # A pending start stores the context in tasks; a denied one (no such environment)
    # records it in the audit event's detail.
    pending = post_raw(client, issuers, "/task/start", body("deploy-prod", "prod", value))
    denied = post_raw(client, issuers, "/task/start", body("analytics-read", "nowhere", value))
    for response in (pending, denied):
        assert response.status_code != 500
        if response.status_code == 400:
            problem = response.get_json()
            assert problem["code"] == "validation_error"
    too_deep = _depth(json.loads(value)) + 1 > MAX_CONTEXT_DEPTH
    if not expected or too_deep:
        assert (pending.status_code, denied.status_code) == (400, 400), value
        if not expected:
            assert pending.get_json()["detail"].startswith("'context.value"), pending.get_json()
        return
    assert (pending.status_code, denied.status_code) == (202, 403), (value, pending.get_json())
    assert same_numbers(value, stored_context(client, issuers, pending)["value"])
    seal_all(keyed)
    report = verify(keyed)
    assert report.ok and report.unsealed == 0, report.problems


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("1E2", 100.0), ("0.1e1", 1.0), ("1.0", 1.0), ("1.10", 1.1), ("1.5e-7", 1.5e-7), ("-0", 0),
        ("-0.0", 0.0), ("0.30000000000000004", 0.30000000000000004), ("9007199254740991", 2**53 - 1),
        ("-9007199254740991", -(2**53 - 1)), ("5e-324", 5e-324), ("[1, 2.5, {\"n\": -7}]", [1, 2.5, {"n": -7}]),
    ],
)  # fmt: skip
def test_accepted_numbers_are_kept_as_their_value(keyed, keyed_client, issuers, text, shown):
    started = post_raw(keyed_client, issuers, "/task/start", body("deploy-prod", "prod", text))
    assert started.status_code == 202, started.get_json()
    value = stored_context(keyed_client, issuers, started)["value"]
    assert value == shown and type(value) is type(shown)
    assert "-0.0" not in json.dumps(value)  # jsonb has no negative zero; neither does the broker


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("100000000000000000000000", "within ±9007199254740991"),
        ("9007199254740992", "within ±9007199254740991"),
        ("9223372036854775808", "within ±9007199254740991"),
        ("1e16", "within ±9007199254740991"),
        ("1e400", "within ±9007199254740991"),
        ("-1e400", "within ±9007199254740991"),
        ("12345678901234567890.5", "within ±9007199254740991"),
        ("3.141592653589793238462643383279", "more digits than a 64-bit float holds"),
        ("1.00000000000000000001", "more digits than a 64-bit float holds"),
        ("1e-400", "more digits than a 64-bit float holds"),
        ('{"deep": [1, 2, 1e400]}', "within ±9007199254740991"),
        ('"\\ud800"', "lone surrogate"),
    ],
)
def test_numbers_that_would_not_come_back_as_sent_are_refused_naming_the_field(
    keyed_client, issuers, text, why
):
    refused = post_raw(keyed_client, issuers, "/task/start", body("deploy-prod", "prod", text))
    assert refused.status_code == 400
    problem = refused.get_json()
    assert problem["code"] == "validation_error"
    assert problem["detail"].startswith("'context.value") and why in problem["detail"], problem


def test_a_refused_number_outside_the_context_names_its_field_too(keyed_client, issuers):
    text = '{"task":"deploy-prod","owner":"alice@example.com","purpose":"numbers from a workload","ttl_seconds":1e400}'
    refused = post_raw(keyed_client, issuers, "/task/start", text)
    assert refused.status_code == 400 and refused.get_json()["detail"].startswith("'ttl_seconds'")


def test_a_lone_surrogate_in_the_purpose_is_refused_not_a_server_error(keyed_client, issuers):
    text = '{"task":"deploy-prod","owner":"alice@example.com","purpose":"weekly \\udc00 report"}'
    refused = post_raw(keyed_client, issuers, "/task/start", text)
    assert refused.status_code == 400 and refused.get_json()["detail"].startswith("'purpose'")


def approve(client, issuers, task_id):
    headers = issuers["sso"].bearer(
        "dba-dana@example.com", groups=["dba"], extra_claims={"email": "dba-dana@example.com"}
    )
    return client.post(
        f"/approvals/{task_id}", json={"decision": "approve", "reason": "CHG-42"}, headers=headers
    )


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=json_text.filter(lambda text: all(number_accepted(n) for n in numbers_in(text))))
def test_an_approved_task_with_any_accepted_context_is_claimed_without_a_409(
    keyed, keyed_client, issuers, value
):
    client = keyed_client
    started = post_raw(client, issuers, "/task/start", body("deploy-prod", "prod", value))
    if started.status_code == 400:  # nested deeper than the context may be
        assert "nest" in started.get_json()["detail"]
        return
    assert started.status_code == 202, started.get_json()
    task_id = started.get_json()["task_id"]
    assert approve(client, issuers, task_id).status_code == 200
    claimed = client.post("/task/claim", json={"task_id": task_id}, headers=issuers["spire"].bearer(AGENT))
    assert claimed.status_code == 200, claimed.get_json()
    finished = client.post("/task/finish", json={"task_id": task_id}, headers=issuers["spire"].bearer(AGENT))
    assert finished.status_code == 200
    seal_all(keyed)
    assert verify(keyed).ok


def test_the_cli_calls_a_chain_full_of_odd_numbers_intact(keyed, keyed_client, issuers, keyed_config):
    for text in ("1E2", "-0.0", "0.1e1", "1.5e-7", "[0.1, -0, 9007199254740991]", '{"a": {"b": [1.0e0]}}'):
        for task, environment in (("deploy-prod", "prod"), ("analytics-read", "nowhere")):
            post_raw(keyed_client, issuers, "/task/start", body(task, environment, text))
    assert seal_all(keyed) >= 12
    result = CliRunner().invoke(
        main, ["audit", "verify", "--config", str(keyed_config)], env={"BROKER_AUDIT_KEY": AUDIT_KEY}
    )
    assert result.exit_code == 0, result.output
    assert "chain intact" in result.stdout


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_the_oracle_and_the_parser_agree_without_a_database(data):
    """The parser's rule against the spec's, on many more numbers than the API tests send."""
    from broker.api.common import _fraction, _integer, _Refused

    text = data.draw(number_text)
    parse = _integer if not any(mark in text for mark in ".eE") else _fraction
    assert (not isinstance(parse(text), _Refused)) == number_accepted(text), text
