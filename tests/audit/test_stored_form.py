"""`stored_form` is what a jsonb column gives back, measured against the real Postgres.

The API refuses the numbers that jsonb would change (test_context_numbers.py); these tests
hold the second line: whatever value reaches an audit row or a request hash, from the API
or from the broker itself, hashes the same before and after the round trip.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb
from sqlalchemy import cast, create_engine, literal, select
from sqlalchemy.dialects.postgresql import JSONB

from broker.canonical import canonical_json, stored_form
from tests.audit.conftest import seal_all, verify

# Postgres stores neither NUL nor a lone surrogate (the API refuses both, named by field in
# test_context_numbers.py), so neither is a value that can reach the database.
_text = st.text(alphabet=st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=5)
# Every double, including -0.0, the huge and the subnormal, and ints far past 2**63.
json_values = st.recursive(
    st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(min_value=-(2**200), max_value=2**200)
    | _text
    | st.booleans()
    | st.none(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_text, children, max_size=3),
    max_leaves=10,
)
EXAMPLES = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture
def connection(stack) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(stack.database_url.replace("+psycopg", ""), autocommit=True) as opened:
        yield opened


@pytest.mark.parametrize(
    ("sent", "read_back"),
    [
        (1e16, 10**16), (1.5e16, 15 * 10**15), (12345678901234567890.5, 12345678901234567000), (-0.0, 0.0),
        (1e300, 10**300), (100.0, 100.0), (1.5e-7, 1.5e-7), (5e-324, 5e-324), (2**70, 2**70), (0.1, 0.1),
    ],
)  # fmt: skip
def test_what_jsonb_does_to_python_numbers(connection, sent, read_back):
    (value,) = connection.execute("SELECT %s::jsonb", (Jsonb(sent),)).fetchone()
    assert value == read_back and type(value) is type(read_back) and repr(value) == repr(read_back)
    assert stored_form(sent) == read_back and type(stored_form(sent)) is type(read_back)


@EXAMPLES
@given(value=json_values)
def test_the_hash_of_a_value_is_the_hash_of_it_read_back(connection, stack, value):
    (through_psycopg,) = connection.execute("SELECT %s::jsonb", (Jsonb(value),)).fetchone()
    assert canonical_json(through_psycopg) == canonical_json(value)
    assert stored_form(value) == through_psycopg
    assert stored_form(through_psycopg) == through_psycopg  # stable: hashing twice changes nothing


def test_the_orm_reads_jsonb_as_psycopg_does(stack):
    # verify_chain and the claim read through SQLAlchemy's JSONB type, the ledger through psycopg.
    engine = create_engine(stack.database_url)
    sent = {"big": 1e16, "zero": -0.0, "tiny": 1.5e-7, "list": [1.0, 2**64]}
    with engine.connect() as opened:
        value = opened.execute(select(cast(literal(json.dumps(sent)), JSONB))).scalar_one()
    engine.dispose()
    assert canonical_json(value) == canonical_json(sent) and value == stored_form(sent)


def test_an_audit_row_the_broker_writes_with_odd_numbers_verifies(keyed):
    """Numbers the API refuses can still come from the broker itself (a policy's output,
    a future field): the MAC covers them as stored."""
    from broker.audit import record
    from broker.db import unit_of_work

    with unit_of_work(keyed.sessions) as session:
        for detail in ({"n": 1e16}, {"z": -0.0}, {"deep": [{"x": 1.5e300}, (1, 2.0)]}, {"big": 2**80}):
            record(session, keyed.clock, "test.numbers", "tester", owner="o", purpose="p", detail=detail)
    assert seal_all(keyed) == 4
    report = verify(keyed)
    assert report.ok and report.checked == 4, report.problems


def test_a_request_hash_is_the_same_for_the_context_sent_and_stored():
    from broker.models import Task
    from broker.tasks.service import request_hash

    def task(context):
        return Task(
            id=uuid.uuid4(), workload="w", task="t", owner="o", purpose="p", ttl_seconds=60, context=context
        )

    sent = {"n": 1e16, "z": -0.0, "list": [1.5e300, 0.1]}
    assert request_hash(task(sent), {}) == request_hash(task(stored_form(sent)), {})
    # And for a context the round trip leaves alone, the hash older builds stored.
    plain = {"environment": "prod", "n": 3, "f": 0.5}
    legacy = json.dumps(
        {
            "workload": "w",
            "task": "t",
            "owner": "o",
            "purpose": "p",
            "ttl_seconds": 60,
            "context": plain,
            "credentials": {},
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    assert request_hash(task(plain), {}) == hashlib.sha256(legacy.encode()).hexdigest()
