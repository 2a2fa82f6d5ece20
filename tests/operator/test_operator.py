"""The operator API: inventory, revocation, kill switch, audit (docs/contract.md §5, §6.8)."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from broker.cli.main import main
from tests.factories import AGENT, can_log_in, role_exists, start_body
from tests.factories import started_task as start
from tests.support.waiting import wait_for

OTHER = "spiffe://example.org/agents/builder"


def dead(stack: Any, creds: dict[str, Any]) -> bool:
    # The database user is gone (not merely refused: mid-revocation it exists without grants).
    return not role_exists(stack, creds["username"])


def sre(issuers):
    return issuers["sso"].bearer("sre-sam@example.com", groups=["sre"])


@pytest.mark.parametrize(
    ("who", "status"),
    [("workload", 403), ("sso-without-sre-group", 403), ("sre", 200), ("none", 401)],
)
@pytest.mark.parametrize("path", ["/leases", "/tasks", "/audit"])
def test_only_operators_use_the_operator_api(client, issuers, who, status, path):
    headers = {
        "workload": issuers["spire"].bearer(AGENT),
        "sso-without-sre-group": issuers["sso"].bearer("bob@example.com", groups=["dba"]),
        "sre": sre(issuers),
        "none": {},
    }[who]
    assert client.get(path, headers=headers).status_code == status


def test_leases_filter_and_page(client, issuers):
    for owner in ("alice@example.com", "alice@example.com", "bob@example.com"):
        start(client, issuers, owner=owner)
    start(client, issuers, sub=OTHER, owner="carol@example.com")
    everything = client.get("/leases", headers=sre(issuers)).get_json()
    assert len(everything["items"]) == 4 and everything["next_cursor"] is None

    alice = client.get("/leases?owner=alice@example.com", headers=sre(issuers)).get_json()["items"]
    assert {lease["owner"] for lease in alice} == {"alice@example.com"} and len(alice) == 2
    other = client.get(f"/leases?workload={OTHER}", headers=sre(issuers)).get_json()["items"]
    assert [lease["workload"] for lease in other] == [OTHER]

    seen, cursor = [], None
    while True:
        query = "/leases?limit=1" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(query, headers=sre(issuers)).get_json()
        seen += [lease["id"] for lease in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(lease["id"] for lease in everything["items"])
    assert len(set(seen)) == 4


@pytest.mark.parametrize(
    "query", ["state=bogus", "limit=0", "limit=x", "task_id=nope", "cursor=%%%", "colour=red"]
)
def test_bad_list_queries_are_400(client, issuers, query):
    response = client.get(f"/leases?{query}", headers=sre(issuers))
    assert response.status_code == 400
    assert response.get_json()["code"] == "validation_error"


def test_limit_is_capped_at_500(client, issuers):
    start(client, issuers)
    assert client.get("/leases?limit=100000", headers=sre(issuers)).status_code == 200


def test_revoke_one_lease(client, issuers, stack):
    task = start(client, issuers)
    lease_id = task["leases"][0]["id"]
    creds = task["credentials"]["db"]["data"]
    response = client.post(
        f"/leases/{lease_id}/revoke", json={"reason": "suspicious queries"}, headers=sre(issuers)
    )
    assert response.status_code == 200
    assert response.get_json()["state"] == "revoked"
    assert not can_log_in(stack, creds)
    read = client.get(f"/task/{task['task_id']}", headers=issuers["spire"].bearer(AGENT)).get_json()
    assert read["state"] == "revoked"
    assert client.get(f"/leases/{lease_id}", headers=sre(issuers)).get_json()["revoked_at"]


def test_unknown_lease_is_404(client, issuers):
    assert client.get("/leases/00000000-0000-4000-8000-000000000000", headers=sre(issuers)).status_code == 404
    assert client.get("/leases/not-a-uuid", headers=sre(issuers)).status_code == 404


def test_kill_switch_revokes_everything_of_one_workload(client, issuers, stack, running_scheduler):
    mine = [start(client, issuers) for _ in range(2)]
    theirs = start(client, issuers, sub=OTHER)
    response = client.post(
        "/leases/revoke", json={"reason": "agent compromised", "workload": AGENT}, headers=sre(issuers)
    )
    assert response.status_code == 200
    answer = response.get_json()
    assert sorted(answer["tasks"]) == sorted(task["task_id"] for task in mine)
    assert answer["revocation"]["tasks"] == 2 and answer["lock"] is None
    # The tasks ended with the answer; their credentials die as the scheduler revokes them.
    for task in mine:
        assert client.get(f"/task/{task['task_id']}", headers=sre(issuers)).get_json()["state"] == "revoked"
        wait_for(partial(dead, stack, task["credentials"]["db"]["data"]), what="revoked")
    wait_for(
        lambda: (
            not client.get("/leases?state=active&task_state=revoked", headers=sre(issuers)).get_json()[
                "items"
            ]
        ),
        what="no active lease of a revoked task",
    )
    assert can_log_in(stack, theirs["credentials"]["db"]["data"])
    again = client.post("/task/start", json=start_body(), headers=issuers["spire"].bearer(AGENT))
    assert again.status_code == 201  # the kill switch revokes; blocking is the policy's job


def test_kill_switch_needs_a_filter(client, issuers):
    response = client.post("/leases/revoke", json={"reason": "oops"}, headers=sre(issuers))
    assert response.status_code == 400


def test_audit_names_actor_owner_purpose_and_filters_by_task(client, issuers):
    """§6.8 attributable: every event names the acting identity, the task, its owner and purpose."""
    task = start(client, issuers)
    client.post("/task/finish", json={"task_id": task["task_id"]}, headers=issuers["spire"].bearer(AGENT))
    events = client.get(f"/audit?task_id={task['task_id']}", headers=sre(issuers)).get_json()["items"]
    names = [event["event"] for event in events]
    assert {"task.start_requested", "lease.issued", "task.started", "lease.revoked", "task.finished"} <= set(
        names
    )
    for event in events:
        assert event["actor"] == AGENT
        assert event["owner"] == "alice@example.com"
        assert event["purpose"] == "weekly revenue report"
        assert event["task_id"] == task["task_id"]
    since = events[0]["at"]
    later = client.get(f"/audit?since={since}", headers=sre(issuers)).get_json()["items"]
    assert all(event["at"] >= since for event in later)


def seal(services):
    from broker.audit import seal_pending
    from broker.db import unit_of_work

    with unit_of_work(services.sessions) as session:
        return seal_pending(session, services.audit_key)


def test_audit_verify_detects_changed_inserted_and_deleted_rows(client, issuers, config_file, services):
    """§6.8 attributable: `broker audit verify` detects a changed, inserted or deleted row."""
    for _ in range(3):
        task = start(client, issuers)
        client.post("/task/finish", json={"task_id": task["task_id"]}, headers=issuers["spire"].bearer(AGENT))

    def verify():
        return CliRunner().invoke(main, ["audit", "verify", "--config", str(config_file)])

    unsealed = verify()
    assert unsealed.exit_code == 0 and "not sealed yet" in unsealed.output
    assert seal(services) > 0
    assert verify().exit_code == 0, verify().output
    with services.engine.begin() as connection:
        seqs = [row[0] for row in connection.execute(text("SELECT seq FROM audit_events ORDER BY seq"))]
        connection.execute(
            text("UPDATE audit_events SET purpose = 'innocent' WHERE seq = :s"), {"s": seqs[2]}
        )
    changed = verify()
    assert changed.exit_code == 1 and f"seq {seqs[2]}" in changed.output
    with services.engine.begin() as connection:
        connection.execute(
            text("UPDATE audit_events SET purpose = 'weekly revenue report' WHERE seq = :s"), {"s": seqs[2]}
        )
    assert verify().exit_code == 0
    with services.engine.begin() as connection:
        connection.execute(text("DELETE FROM audit_events WHERE seq = :s"), {"s": seqs[4]})
    assert verify().exit_code == 1
    with services.engine.begin() as connection:
        connection.execute(text("TRUNCATE audit_events, audit_head"))
    for _ in range(2):
        start(client, issuers)
    seal(services)
    with services.engine.begin() as connection:
        last = connection.execute(text("SELECT max(seq) FROM audit_events")).scalar_one()
        connection.execute(text("DELETE FROM audit_events WHERE seq = :s"), {"s": last})
    tail = verify()
    assert tail.exit_code == 1 and "head mismatch" in tail.output


def test_audit_verify_without_the_database_says_so_in_one_line_and_exits_3(config_file):
    # Exit 1 means tampered: an alert on it must not fire, or be silenced, for an outage.
    from broker.dev.stack.postgres import free_port

    closed = f"postgresql+psycopg://broker@127.0.0.1:{free_port()}/broker"
    result = CliRunner().invoke(
        main, ["audit", "verify", "--config", str(config_file)], env={"BROKER_DATABASE_URL": closed}
    )
    assert result.exit_code == 3, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("audit verify: the database could not be reached: ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_with_an_audit_key_a_forged_event_is_never_sealed(
    stack, issuers, policy_file, clean_db, monkeypatch, tmp_path
):
    import yaml

    from broker.app import create_app
    from broker.config import settings_from_mapping
    from broker.services import build_services
    from tests.conftest import broker_config

    # In the environment for `broker audit verify` below, which reads it like `broker serve`.
    monkeypatch.setenv("BROKER_AUDIT_KEY", "k" * 32)
    config = broker_config(stack, issuers, policy_file)
    services = build_services(settings_from_mapping(config, env={"BROKER_AUDIT_KEY": "k" * 32}))
    client = create_app(services=services).test_client()
    start(client, issuers)
    with services.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO audit_events (id, at, event, actor, detail, row_mac)"
                " VALUES (gen_random_uuid(), now(), 'lease.revoked', 'sre-sam', '{}', repeat('a', 64))"
            )
        )
    sealed = seal(services)
    path = tmp_path / "broker.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["audit", "verify", "--config", str(path)])
    services.close()
    assert sealed >= 3
    assert result.exit_code == 1 and "forged" in result.output


def test_sealing_in_batches_links_every_good_event_in_order_around_a_forged_one(client, issuers, services):
    from broker.audit import seal_pending, verify_chain
    from broker.db import unit_of_work

    start(client, issuers)
    with services.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO audit_events (id, at, event, actor, detail, row_mac)"
                " VALUES (gen_random_uuid(), now(), 'lease.revoked', 'sre-sam', '{}', repeat('a', 64))"
            )
        )
    start(client, issuers, sub=OTHER)
    sealed: list[int] = []
    while not sealed or sealed[-1]:
        with unit_of_work(services.sessions) as session:
            sealed.append(seal_pending(session, services.audit_key, limit=2))
    with services.engine.connect() as connection:
        rows = connection.execute(text("SELECT seq, chain_seq, actor FROM audit_events ORDER BY seq")).all()
        head = connection.execute(text("SELECT seq FROM audit_head")).scalar_one()
    good = [row for row in rows if row.actor != "sre-sam"]
    assert [row.chain_seq for row in good] == list(range(1, len(good) + 1)) == list(range(1, sum(sealed) + 1))
    assert [row.chain_seq for row in rows if row.actor == "sre-sam"] == [None]
    assert head == len(good) and len(sealed) > 2
    with unit_of_work(services.sessions) as session:
        report = verify_chain(session, services.audit_key)
    assert report.checked == len(good) and report.unsealed == 1
    assert [problem.problem.split(":")[0] for problem in report.problems] == ["content changed or forged"]


def test_an_anchor_kept_outside_catches_a_deleted_tail_with_a_rewound_head(
    client, issuers, config_file, services, tmp_path
):
    anchor = tmp_path / "anchor.json"
    for _ in range(2):
        start(client, issuers)
    seal(services)

    def verify():
        return CliRunner().invoke(
            main, ["audit", "verify", "--config", str(config_file), "--anchor", str(anchor)]
        )

    assert verify().exit_code == 0 and anchor.exists()
    with services.engine.begin() as connection:
        last = connection.execute(text("SELECT max(chain_seq) FROM audit_events")).scalar_one()
        connection.execute(text("DELETE FROM audit_events WHERE chain_seq > :s"), {"s": last - 2})
        connection.execute(
            text(
                "UPDATE audit_head SET seq = e.chain_seq, hash = e.hash FROM audit_events e WHERE e.chain_seq = :s"
            ),
            {"s": last - 2},
        )
    assert (
        CliRunner().invoke(main, ["audit", "verify", "--config", str(config_file)]).exit_code == 0
    )  # fooled
    caught = verify()
    assert caught.exit_code == 1 and "anchor missing" in caught.output


def test_a_deleted_chain_head_stops_sealing_and_is_reported(client, issuers, config_file, services):
    start(client, issuers)
    seal(services)
    with services.engine.begin() as connection:
        connection.execute(text("DELETE FROM audit_head"))
    start(client, issuers)
    assert seal(services) == 0
    result = CliRunner().invoke(main, ["audit", "verify", "--config", str(config_file)])
    assert result.exit_code == 1 and "head" in result.output


def test_an_anchor_taken_before_anything_was_sealed_is_not_a_false_alarm(
    client, issuers, config_file, services, tmp_path
):
    anchor = tmp_path / "anchor.json"
    args = ["audit", "verify", "--config", str(config_file), "--anchor", str(anchor)]
    start(client, issuers)
    assert CliRunner().invoke(main, args).exit_code == 0
    seal(services)
    assert CliRunner().invoke(main, args).exit_code == 0


def test_audit_takes_the_same_task_and_state_filters(client, issuers):
    analytics = start(client, issuers)
    everything = start(client, issuers, task="everything")
    client.post(
        "/task/finish", json={"task_id": everything["task_id"]}, headers=issuers["spire"].bearer(AGENT)
    )
    by_task = client.get("/audit?task=analytics-read", headers=sre(issuers)).get_json()["items"]
    assert by_task and {event["task_id"] for event in by_task} == {analytics["task_id"]}
    by_state = client.get("/audit?state=finished", headers=sre(issuers)).get_json()["items"]
    assert by_state and {event["task_id"] for event in by_state} == {everything["task_id"]}


def test_audit_by_workload_includes_what_others_did_to_its_tasks(client, issuers):
    task = start(client, issuers)
    revoked = client.post(
        f"/leases/{task['leases'][0]['id']}/revoke", json={"reason": "rotating"}, headers=sre(issuers)
    )
    assert revoked.status_code == 200
    events = client.get(f"/audit?workload={AGENT}", headers=sre(issuers)).get_json()["items"]
    by_actor = {(event["event"], event["actor"] == AGENT) for event in events}
    assert ("task.started", True) in by_actor
    assert ("lease.revoked", False) in by_actor  # the operator's revoke of the workload's lease


def test_audit_by_task_type_includes_refused_starts(client, issuers):
    refused = client.post(
        "/task/start", json=start_body(owner="mallory@evil.test"), headers=issuers["spire"].bearer(AGENT)
    )
    assert refused.status_code == 403
    denied = client.get("/audit?task=analytics-read&event=task.denied", headers=sre(issuers)).get_json()[
        "items"
    ]
    assert [event["detail"]["task"] for event in denied] == ["analytics-read"]
    assert (
        client.get("/audit?task=everything&event=task.denied", headers=sre(issuers)).get_json()["items"] == []
    )


@pytest.mark.parametrize(
    "query",
    [
        "?state=bogus",
        "?since=2026-12-02T15:00:00",  # no offset: which zone?
        "?since=1733000000",
        "?event=task.started&event=task.finished",
    ],
)
def test_a_bad_audit_query_is_a_validation_error(client, issuers, query):
    response = client.get(f"/audit{query}", headers=sre(issuers))
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["code"] == "validation_error"


def test_since_takes_an_offset(client, issuers):
    start(client, issuers)
    response = client.get("/audit?since=2000-01-01T01:00:00%2B01:00", headers=sre(issuers))
    assert response.status_code == 200 and response.get_json()["items"]


def test_the_kill_switch_event_names_its_target_owner_and_reason(client, issuers):
    start(client, issuers)
    body = {"reason": "laptop stolen", "owner": "alice@example.com"}
    assert client.post("/leases/revoke", json=body, headers=sre(issuers)).status_code == 200
    [event] = client.get("/audit?event=operator.kill_switch", headers=sre(issuers)).get_json()["items"]
    assert (event["owner"], event["purpose"], event["detail"]["owner"]) == (
        "alice@example.com",
        "laptop stolen",
        "alice@example.com",
    )
    assert event["actor"].endswith("sre-sam@example.com")
