"""`broker audit export` and `broker audit tail`: sealed events out, in chain order, one JSON object a line."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid

from click.testing import CliRunner
from sqlalchemy import text

from broker.audit import seal_pending
from broker.audit.export import SCHEMA
from broker.cli.main import main
from broker.db import unit_of_work
from tests.factories import AGENT, start_body
from tests.support.broker_procs import interruptible

FIELDS = {"schema", "id", "chain_seq", "at", "event", "actor", "task_id", "lease_id", "owner", "purpose",
          "detail", "prev_hash", "hash"}  # fmt: skip


def _seal(services):
    with unit_of_work(services.sessions) as session:
        seal_pending(session, services.audit_key)


def _lines(output):
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def test_export_prints_every_sealed_event_since_a_time_in_chain_order(client, issuers, services, config_file):
    started = client.post("/task/start", json=start_body(), headers=issuers["spire"].bearer(AGENT)).get_json()
    client.post("/task/finish", json={"task_id": started["task_id"]}, headers=issuers["spire"].bearer(AGENT))
    _seal(services)
    result = CliRunner().invoke(
        main, ["audit", "export", "--config", str(config_file), "--since", "2000-01-01T00:00:00Z"]
    )
    assert result.exit_code == 0, result.output
    events = _lines(result.output)
    assert [event["chain_seq"] for event in events] == list(range(1, len(events) + 1))
    assert all(set(event) == FIELDS and event["schema"] == SCHEMA for event in events)
    names = [event["event"] for event in events if event["task_id"] == started["task_id"]]
    assert names[0] == "task.start_requested" and "lease.revoked" in names and names[-1] == "task.finished"
    for later, earlier in zip(events[1:], events, strict=False):
        assert later["prev_hash"] == earlier["hash"]  # a SIEM can check the chain's continuity
    assert all(event["owner"] == "alice@example.com" and event["actor"] for event in events)
    password = started["credentials"]["db"]["data"]["password"]
    assert password not in result.output

    future = CliRunner().invoke(
        main, ["audit", "export", "--config", str(config_file), "--since", "2999-01-01T00:00:00Z"]
    )
    assert future.exit_code == 0 and future.output == ""


def test_export_refuses_a_time_without_an_offset(config_file):
    result = CliRunner().invoke(
        main, ["audit", "export", "--config", str(config_file), "--since", "2026-12-01"]
    )
    assert result.exit_code == 2 and "offset" in result.output


def test_tail_prints_the_newest_and_follow_prints_what_is_sealed_later(
    client, issuers, services, config_file
):
    for _ in range(2):
        started = client.post(
            "/task/start", json=start_body(), headers=issuers["spire"].bearer(AGENT)
        ).get_json()
        client.post(
            "/task/finish", json={"task_id": started["task_id"]}, headers=issuers["spire"].bearer(AGENT)
        )
    _seal(services)
    newest = CliRunner().invoke(main, ["audit", "tail", "--config", str(config_file), "-n", "2"])
    assert newest.exit_code == 0, newest.output
    two = _lines(newest.output)
    assert len(two) == 2 and two[0]["chain_seq"] + 1 == two[1]["chain_seq"]

    follower = interruptible(
        [sys.executable, "-m", "broker", "audit", "tail", "--config", str(config_file), "-n", "0", "--follow",
         "--interval", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ},
    )  # fmt: skip
    assert follower.stderr is not None
    try:
        ready, _, _ = select.select([follower.stderr], [], [], 60)
        assert ready and "following the audit chain" in follower.stderr.readline()
        task = client.post(
            "/task/start", json=start_body(), headers=issuers["spire"].bearer(AGENT)
        ).get_json()
        assert "task_id" in task, task
        _seal(services)
        time.sleep(1.5)
    finally:
        follower.send_signal(signal.SIGINT)
        out, err = follower.communicate(timeout=10)
    followed = _lines(out)
    assert followed, err
    assert {event["task_id"] for event in followed} == {task["task_id"]}
    assert [event["chain_seq"] for event in followed] == sorted(event["chain_seq"] for event in followed)


def _write_out_of_order(services) -> None:
    """Three events written in `seq` order a, b, c, where the chain holds b before a (two
    transactions committed out of order, the case chain order exists for) and c is not sealed
    yet. Written directly: the order can't be forced through the sealer."""
    with services.engine.begin() as connection:
        for name, chain_seq in (
            ("test.first_written", 2),
            ("test.second_written", 1),
            ("test.unsealed", None),
        ):
            connection.execute(
                text(
                    "INSERT INTO audit_events (id, at, event, actor, detail, row_mac, chain_seq, prev_hash, hash)"
                    " VALUES (:id, now(), :event, 'test', '{}', 'mac', :chain_seq, :prev, :hash)"
                ),
                {
                    "id": str(uuid.uuid4()),
                    "event": name,
                    "chain_seq": chain_seq,
                    "prev": None if chain_seq is None else f"prev-{chain_seq}",
                    "hash": None if chain_seq is None else f"hash-{chain_seq}",
                },
            )


def test_export_is_in_chain_order_not_insertion_order_and_leaves_out_the_unsealed(services, config_file):
    _write_out_of_order(services)
    result = CliRunner().invoke(
        main, ["audit", "export", "--config", str(config_file), "--since", "2000-01-01T00:00:00Z"]
    )
    assert result.exit_code == 0, result.output
    events = _lines(result.output)
    assert [(event["chain_seq"], event["event"]) for event in events] == [
        (1, "test.second_written"),
        (2, "test.first_written"),
    ]


def test_tail_is_in_chain_order_not_insertion_order_and_leaves_out_the_unsealed(services, config_file):
    _write_out_of_order(services)
    result = CliRunner().invoke(main, ["audit", "tail", "--config", str(config_file), "-n", "2"])
    assert result.exit_code == 0, result.output
    assert [event["event"] for event in _lines(result.output)] == [
        "test.second_written",
        "test.first_written",
    ]
