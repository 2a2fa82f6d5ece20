from __future__ import annotations

import uuid

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import IntegrityError

from broker.migrate import alembic_config, current_revision, upgrade_to_head


def test_upgrade_from_empty_creates_the_ledger(empty_database):
    upgrade_to_head(empty_database)
    engine = create_engine(empty_database)
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert {"tasks", "leases", "approvals", "audit_events", "audit_head", "used_jtis"} <= tables
    assert current_revision(empty_database) is not None


def test_upgrade_twice_is_a_no_op_and_downgrade_round_trips(empty_database):
    from alembic import command

    upgrade_to_head(empty_database)
    head = current_revision(empty_database)
    upgrade_to_head(empty_database)
    assert current_revision(empty_database) == head
    command.downgrade(alembic_config(empty_database), "base")
    assert current_revision(empty_database) is None
    upgrade_to_head(empty_database)
    assert current_revision(empty_database) == head


def test_the_schema_refuses_unknown_states(empty_database):
    upgrade_to_head(empty_database)
    engine = create_engine(empty_database)
    insert = text(
        "INSERT INTO tasks (id, task, state, workload, workload_issuer, owner, purpose, context,"
        " ttl_seconds, request_hash) VALUES (:id, 't', :state, 'w', 'i', 'o', 'purpose!', '{}', 60, 'h')"
    )
    with engine.begin() as connection:
        connection.execute(insert, {"id": uuid.uuid4(), "state": "active"})
    with pytest.raises(IntegrityError, match="ck_tasks_state"), engine.begin() as connection:
        connection.execute(insert, {"id": uuid.uuid4(), "state": "half-revoked"})
    engine.dispose()


def test_the_sweeper_query_uses_its_index(stack, clean_db):
    engine = create_engine(stack.database_url)
    with engine.connect() as connection:
        connection.execute(text("SET enable_seqscan = off"))
        plan = "\n".join(
            row[0]
            for row in connection.execute(
                text(
                    "EXPLAIN SELECT id FROM tasks WHERE state = 'active' AND expires_at <= now()"
                    " ORDER BY expires_at LIMIT 1 FOR UPDATE SKIP LOCKED"
                )
            )
        )
    engine.dispose()
    assert "ix_tasks_due" in plan


def test_the_migrations_build_exactly_the_models_schema(empty_database):
    # A model change without its revision (or the reverse) would make tests, which build
    # the schema with Alembic, disagree with the code that reads it.
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from broker.db import Base

    upgrade_to_head(empty_database)
    engine = create_engine(empty_database)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    assert differences == []
