"""Separation of duties against the real stack: no respelling of the owner or the workload
approves, and one person is one approval however many issuers vouch for them."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.config import settings_from_mapping
from tests.conftest import broker_config
from tests.factories import AGENT, start_body
from tests.support.people import CONTROLS, INVISIBLES, LOOKALIKES, owners, respellings
from tests.support.tokens import TestIssuer

PROD = start_body("deploy-prod", purpose="release 1.4 to production", context={"environment": "prod"})
TWO_PEOPLE = """
  deploy-two:
    description: Needs two different people
    ttl: {default: 120, max: 600}
    workloads: [{issuer: spire, subject: "spiffe://example.org/agents/*"}]
    owners: ["*@example.com"]
    approval:
      approvers: {groups: [dba]}
      min_approvals: 2
    credentials:
      db: {kind: database, mount: database, role: analytics-ro}
"""
# One test function runs many examples on one app; each example is a request or two.
against_the_stack = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture
def stack_app(stack, issuers, policy_file, clean_db, tmp_path) -> Iterator[Any]:
    """The broker with two more issuers: the SPIRE issuer may also approve (as an issuer
    serving both workloads and people might), and a partner SSO asserts emails too."""
    from broker.app import create_app
    from broker.services import build_services

    spire = TestIssuer.create(
        tmp_path,
        name="spire",
        issuer="https://spire.test",
        kind="spiffe",
        use=["workload", "approver"],
        key=issuers["spire"].key,
    )
    partner = TestIssuer.create(tmp_path, name="partner-sso", issuer="https://partner.test", use=["approver"])
    policy_file.write_text(policy_file.read_text() + TWO_PEOPLE)
    config = broker_config(stack, {**issuers, "spire": spire, "partner": partner}, policy_file)
    built = build_services(settings_from_mapping(config, env={}))
    client = create_app(services=built).test_client()
    yield SimpleNamespace(client=client, spire=spire, sso=issuers["sso"], partner=partner)
    built.close()


def start(app: Any, body: dict[str, Any]) -> Any:
    return app.client.post("/task/start", json=body, headers=app.spire.bearer(AGENT))


def pending(app: Any, **overrides: Any) -> str:
    response = start(app, {**PROD, **overrides})
    assert response.status_code == 202, response.get_json()
    return str(response.get_json()["task_id"])


def decide(
    app: Any, headers: dict[str, str], task_id: str, decision: str = "approve", reason: str = "CHG-42"
) -> Any:
    return app.client.post(
        f"/approvals/{task_id}", json={"decision": decision, "reason": reason}, headers=headers
    )


def person(issuer: TestIssuer, sub: str, email: str | None = None, **claims: Any) -> dict[str, str]:
    extra = {**({"email": email} if email is not None else {}), **claims}
    return issuer.bearer(sub, groups=["dba"], extra_claims=extra)


# -- the owner -------------------------------------------------------------------------------


@against_the_stack
@given(data=st.data(), owner=owners("example.com"))
def test_no_respelling_of_the_owner_approves_their_own_task(stack_app, data, owner):
    """§6.11 one person, one identity: no respelling lets an owner approve their own task."""
    # The owner as the workload sent it (any accepted spelling) ...
    task_id = pending(stack_app, owner=data.draw(respellings(owner, invisible=False)))
    # ... and the approver's identity as another respelling, in its email or its subject.
    spelt = data.draw(respellings(owner, lookalikes=True))
    issuer = data.draw(st.sampled_from([stack_app.sso, stack_app.partner]))
    as_subject = data.draw(st.booleans())
    if as_subject:
        headers = person(issuer, spelt, email=data.draw(st.sampled_from([None, "dba-dana@example.com"])))
    else:
        headers = person(issuer, "dba-dana", email=spelt)
    response = decide(stack_app, headers, task_id)
    if as_subject and not spelt.isprintable():
        # Refused earlier still: a `sub` with hidden characters is no identity at all.
        assert response.status_code == 401, response.get_json()
        return
    assert response.status_code == 403, (owner, spelt, response.get_json())
    assert response.get_json()["code"] == "forbidden"


@against_the_stack
@given(owner=owners("example.com"), hidden=st.sampled_from(INVISIBLES + CONTROLS), at=st.integers(0, 40))
def test_an_owner_with_hidden_characters_is_a_validation_error(stack_app, owner, hidden, at):
    at = min(at, len(owner))
    response = start(stack_app, {**PROD, "owner": owner[:at] + hidden + owner[at:]})
    assert response.status_code == 400
    problem = response.get_json()
    assert problem["code"] == "validation_error"
    assert "owner" in problem["detail"]


@against_the_stack
@given(owner=owners("example.com"), at=st.integers(0, 40), data=st.data())
def test_an_owner_mixing_look_alike_scripts_is_a_validation_error(stack_app, owner, at, data):
    at = min(at, len(owner))
    letter = data.draw(st.sampled_from(sorted({c for cs in LOOKALIKES.values() for c in cs})))
    response = start(stack_app, {**PROD, "owner": owner[:at] + letter + owner[at:]})
    assert response.status_code == 400
    assert "'owner'" in response.get_json()["detail"]


def test_the_owner_is_kept_in_its_normal_form(stack_app):
    response = start(stack_app, {**PROD, "owner": " Alice@\uff25xample.com\u3000"})
    assert response.status_code == 202, response.get_json()
    task = stack_app.client.get(
        f"/task/{response.get_json()['task_id']}", headers=stack_app.spire.bearer(AGENT)
    )
    assert task.get_json()["owner"] == "alice@example.com"


@pytest.mark.parametrize("field", ["purpose", "reason"])
@pytest.mark.parametrize("hidden", ["\t", "\n", "\r\n", "\u2028", "\u200b", "\u202e", "\u2066", "\u00ad"])
def test_purpose_and_reason_refuse_control_bidi_and_invisible_characters(stack_app, field, hidden):
    if field == "purpose":
        response = start(stack_app, {**PROD, "purpose": f"release{hidden}1.4 to production"})
    else:
        task_id = pending(stack_app)
        headers = person(stack_app.sso, "dba-dana", email="dba-dana@example.com")
        response = decide(stack_app, headers, task_id, reason=f"CHG-42{hidden}approved by the CAB")
    assert response.status_code == 400
    assert response.get_json()["code"] == "validation_error"
    assert f"'{field}'" in response.get_json()["detail"]


# -- the workload ----------------------------------------------------------------------------


def test_the_requesting_workload_cannot_approve_even_with_the_approver_use(stack_app):
    task_id = pending(stack_app)
    # Same token subject, same issuer, which grants `approver` and puts it in the dba group:
    # only the workload rule stands between it and its own approval.
    response = decide(stack_app, stack_app.spire.bearer(AGENT, groups=["dba"]), task_id)
    assert response.status_code == 403
    assert response.get_json()["detail"] == "the requesting workload can't approve its own task"
    # Another agent of the same issuer, equally in `dba`, may: the refusal was about who.
    other = stack_app.spire.bearer("spiffe://example.org/agents/reviewer", groups=["dba"])
    assert decide(stack_app, other, task_id).status_code == 200


# -- one person, one approval ----------------------------------------------------------------


def test_one_verified_email_is_one_approver_across_issuers(stack_app):
    """§6.11 one person, one identity: one verified email is one vote, whichever issuer vouches."""
    task_id = pending(stack_app, task="deploy-two")
    dana_sso = person(stack_app.sso, "00u1dana", email="dba-dana@example.com")
    dana_partner = person(stack_app.partner, "p-77", email="DBA-Dana@Example.com", email_verified=True)
    assert decide(stack_app, dana_sso, task_id).status_code == 200
    again = decide(stack_app, dana_partner, task_id)
    assert again.status_code == 409
    assert "already decided" in again.get_json()["detail"]

    dora = person(stack_app.partner, "p-78", email="dba-dora@example.com")
    approved = decide(stack_app, dora, task_id)
    assert approved.status_code == 200
    assert approved.get_json()["approval"]["state"] == "approved"


def test_an_unverified_email_does_not_join_accounts(stack_app):
    task_id = pending(stack_app, task="deploy-two")
    assert (
        decide(
            stack_app, person(stack_app.sso, "00u1dana", email="dba-dana@example.com"), task_id
        ).status_code
        == 200
    )
    # Anyone can type an email into an unverifying IdP: it counts under its subject.
    unverified = person(stack_app.partner, "p-99", email="dba-dana@example.com", email_verified=False)
    response = decide(stack_app, unverified, task_id)
    assert response.status_code == 200
    assert response.get_json()["approval"]["state"] == "approved"


@pytest.mark.parametrize("issuer", ["sso", "partner"])
def test_the_owner_cannot_approve_through_any_issuer_that_asserts_their_email(stack_app, issuer):
    task_id = pending(stack_app, owner="dba-dana@example.com")
    headers = person(getattr(stack_app, issuer), f"{issuer}-subject-1", email="dba-dana@example.com")
    response = decide(stack_app, headers, task_id)
    assert response.status_code == 403
    assert response.get_json()["detail"] == "the task's owner can't approve it"
