"""`broker audit verify` with no audit key or another one says so in one line and exits 4,
before checking a single row: every MAC would fail, which says nothing about the rows."""

from __future__ import annotations

import logging

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from broker.cli.main import main
from tests.audit.conftest import AUDIT_KEY, seal_all
from tests.factories import AGENT, start_body

PENDING = start_body("deploy-prod", purpose="release 1.4 to production", context={"environment": "prod"})


def some_events(client, issuers, services, count=3):
    for _ in range(count):
        started = client.post("/task/start", json=PENDING, headers=issuers["spire"].bearer(AGENT))
        assert started.status_code == 202
    assert seal_all(services) >= count


def verify_cli(config, key):
    # None removes the variable for the run; the broker's own key stays in the test's env.
    return CliRunner().invoke(
        main, ["audit", "verify", "--config", str(config)], env={"BROKER_AUDIT_KEY": key}
    )


def assert_one_line(result, exit_code, message):
    assert result.exit_code == exit_code, result.output
    assert result.stdout == ""
    assert result.stderr == f"audit verify: {message}\n"
    assert AUDIT_KEY not in result.output


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (
            "not-the-audit-key-at-all-0123456789",
            "$BROKER_AUDIT_KEY is not the key the audit chain was written with",
        ),
        (None, "no audit key: set $BROKER_AUDIT_KEY to the key the broker writes the audit chain with"),
        ("", "no audit key: set $BROKER_AUDIT_KEY to the key the broker writes the audit chain with"),
    ],
)
def test_a_keyed_chain_verified_with_no_or_another_key(
    keyed, keyed_client, issuers, keyed_config, key, message
):
    some_events(keyed_client, issuers, keyed)
    assert_one_line(verify_cli(keyed_config, key), 4, message)
    assert verify_cli(keyed_config, AUDIT_KEY).exit_code == 0


def test_an_unkeyed_chain_verified_with_a_key(client, issuers, services, config_file):
    some_events(client, issuers, services)
    assert_one_line(
        verify_cli(config_file, AUDIT_KEY),
        4,
        "the audit chain was written without a key, but $BROKER_AUDIT_KEY is set",
    )
    assert verify_cli(config_file, None).exit_code == 0


def test_a_sealer_with_another_key_links_nothing(keyed, keyed_client, issuers, caplog):
    from broker.audit import seal_pending
    from broker.db import unit_of_work

    some_events(keyed_client, issuers, keyed, count=1)
    keyed_client.post("/task/start", json=PENDING, headers=issuers["spire"].bearer(AGENT))
    with caplog.at_level(logging.ERROR), unit_of_work(keyed.sessions) as session:
        assert seal_pending(session, b"a stray replica's key") == 0
    assert "differs from the one the audit chain is under" in caplog.text
    assert AUDIT_KEY not in caplog.text
    assert seal_all(keyed) == 1  # the right key seals it


def test_a_head_from_before_the_key_check_is_stamped_by_the_next_seal(
    keyed, keyed_client, issuers, keyed_config
):
    some_events(keyed_client, issuers, keyed)
    with keyed.engine.begin() as connection:
        connection.execute(text("UPDATE audit_head SET key_check = NULL"))
    # Without a stored check the newest link tells: it does not verify under another key.
    assert_one_line(
        verify_cli(keyed_config, "another-key-entirely-0123456789abc"),
        4,
        "$BROKER_AUDIT_KEY is not the key the audit chain was written with",
    )
    assert verify_cli(keyed_config, AUDIT_KEY).exit_code == 0
    from broker.audit import seal_pending
    from broker.db import unit_of_work

    with unit_of_work(keyed.sessions) as session:
        assert seal_pending(session, b"a stray replica's key") == 0  # would stamp the wrong key
    with keyed.engine.connect() as connection:
        assert connection.execute(text("SELECT key_check FROM audit_head")).scalar_one() is None
    seal_all(keyed)
    with keyed.engine.connect() as connection:
        assert connection.execute(text("SELECT key_check FROM audit_head")).scalar_one() is not None


def test_a_real_change_under_the_right_key_is_still_tampered(keyed, keyed_client, issuers, keyed_config):
    some_events(keyed_client, issuers, keyed)
    with keyed.engine.begin() as connection:
        connection.execute(text("UPDATE audit_events SET purpose = 'innocent' WHERE chain_seq = 2"))
    result = verify_cli(keyed_config, AUDIT_KEY)
    assert result.exit_code == 1 and "content changed" in result.stdout and "TAMPERED" in result.stderr
