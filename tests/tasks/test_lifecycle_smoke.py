from __future__ import annotations

import psycopg
import pytest

from tests.factories import AGENT

START = {
    "task": "analytics-read",
    "owner": "alice@example.com",
    "purpose": "weekly revenue report",
    "context": {"environment": "staging"},
}


def test_database_credentials_work_until_finish(client, issuers, stack):
    headers = issuers["spire"].bearer(AGENT)
    started = client.post("/task/start", json=START, headers=headers)
    assert started.status_code == 201, started.get_json()
    body = started.get_json()
    creds = body["credentials"]["db"]["data"]
    dsn = f"postgresql://{creds['username']}:{creds['password']}@127.0.0.1:{stack.postgres.port}/analytics"
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM analytics.events").fetchone()
        assert row is not None
        assert row[0] >= 1

    finished = client.post("/task/finish", json={"task_id": body["task_id"]}, headers=headers)
    assert finished.status_code == 200, finished.get_json()
    assert finished.get_json()["state"] == "finished"
    assert [lease["state"] for lease in finished.get_json()["leases"]] == ["revoked"]
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=3)
