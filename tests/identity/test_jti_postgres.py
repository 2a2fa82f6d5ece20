"""Single-use tokens against the store production uses: `PostgresJtiStore` on the test
Postgres (docs/contract.md §3 "an issuer with `single_use: true` accepts each `jti` once").

The other replay tests use an in-memory store; these show the Postgres one keeps the
same promise across verifiers, threads and processes, and stays bounded.
"""

from __future__ import annotations

import multiprocessing
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select

from broker.identity import InvalidToken, Verifier
from broker.identity.replay import PostgresJtiStore
from broker.models import UsedJti
from tests.support.tokens import FakeClock, TestIssuer

SUB = "spiffe://example.org/agents/reporter"


@pytest.fixture
def engine(stack: Any, clean_db: None) -> Any:
    engine = create_engine(stack.database_url, pool_size=20)
    yield engine
    engine.dispose()


@pytest.fixture
def per_request(tmp_path: Path) -> TestIssuer:
    return TestIssuer.create(tmp_path, name="spire-rq", kind="spiffe", single_use=True)


def _verifier(issuer: TestIssuer, engine: Any) -> Verifier:
    return Verifier(
        [issuer.settings()],
        clock_skew_seconds=30,
        max_token_bytes=8192,
        jti_store=PostgresJtiStore(engine),
        operator_groups=(),
    )


def _outcome(verifier: Verifier, token: str) -> str:
    try:
        verifier.verify(token)
    except InvalidToken as error:
        return error.detail
    return "ok"


def test_single_use_a_replayed_jti_is_refused_by_postgres_across_workers(per_request, engine, stack):
    token = per_request.mint(SUB, jti="once")
    first, second = _verifier(per_request, engine), _verifier(per_request, engine)
    assert _outcome(first, token) == "ok"
    assert _outcome(first, token) == "token already used"
    # Another worker (its own verifier and connection pool) sees the same spent jti.
    other_engine = create_engine(stack.database_url)
    try:
        assert _outcome(_verifier(per_request, other_engine), token) == "token already used"
    finally:
        other_engine.dispose()
    assert _outcome(second, per_request.mint(SUB, jti="once", exp_in=200)) == "token already used"
    assert _outcome(second, per_request.mint(SUB, jti="twice")) == "ok"


def test_single_use_concurrent_replays_from_threads_have_exactly_one_winner(per_request, engine):
    token = per_request.mint(SUB, jti="race")
    threads = 12
    verifiers = [_verifier(per_request, engine) for _ in range(threads)]
    barrier = threading.Barrier(threads)
    outcomes: list[str] = []
    lock = threading.Lock()

    def attempt(verifier: Verifier) -> None:
        barrier.wait()
        result = _outcome(verifier, token)
        with lock:
            outcomes.append(result)

    workers = [threading.Thread(target=attempt, args=(v,)) for v in verifiers]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
    assert sorted(outcomes) == ["ok"] + ["token already used"] * (threads - 1)


def _claim_in_process(url: str, start: Any, results: Any) -> None:
    engine = create_engine(url)
    store = PostgresJtiStore(engine)
    start.wait()
    results.put(store.claim("spire-rq", "two-processes", datetime.now(UTC) + timedelta(minutes=5)))
    engine.dispose()


def test_single_use_two_processes_claiming_one_jti_have_exactly_one_winner(stack, engine):
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(2), context.Queue()
    processes = [
        context.Process(target=_claim_in_process, args=(stack.database_url, start, results)) for _ in range(2)
    ]
    for process in processes:
        process.start()
    outcomes = sorted(results.get(timeout=60) for _ in processes)
    for process in processes:
        process.join(timeout=30)
    assert outcomes == [False, True]


def test_single_use_spent_jtis_are_purged_only_once_expired(engine):
    store = PostgresJtiStore(engine)
    now = datetime.now(UTC)
    for n in range(5):
        assert store.claim("spire-rq", f"old-{n}", now - timedelta(seconds=1 + n))
    assert store.claim("spire-rq", "live", now + timedelta(minutes=5))

    assert store.purge_expired(now) == 5
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(UsedJti)) == 1
    # The live one is still spent: a purge never reopens a token that could be accepted.
    assert not store.claim("spire-rq", "live", now + timedelta(minutes=5))


def test_single_use_the_store_keeps_a_jti_until_exp_plus_skew(per_request, engine):
    clock = FakeClock()
    verifier = Verifier(
        [per_request.settings()],
        clock_skew_seconds=30,
        max_token_bytes=8192,
        jti_store=PostgresJtiStore(engine),
        operator_groups=(),
        clock=clock,
    )
    per_request.clock = clock
    verifier.verify(per_request.mint(SUB, jti="kept", exp_in=120))
    with engine.connect() as connection:
        kept = connection.scalar(select(UsedJti.expires_at).where(UsedJti.jti == "kept"))
    assert kept == datetime.fromtimestamp(int(clock()) + 120 + 30, UTC)
