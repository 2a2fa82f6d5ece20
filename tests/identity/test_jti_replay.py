"""Single-use issuers: each jti once (catalogue J20, J21)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from broker.identity import InvalidToken, Verifier
from tests.support.tokens import OMIT, FakeClock, TestIssuer

SUB = "spiffe://example.org/agents/reporter"


@pytest.fixture
def per_request(tmp_path: Path, clock: FakeClock) -> TestIssuer:
    return TestIssuer.create(tmp_path, name="spire-rq", kind="spiffe", single_use=True, clock=clock)


@pytest.fixture
def verifier(make_verifier: Callable[..., Verifier], per_request: TestIssuer) -> Verifier:
    return make_verifier(per_request, skew=30)


def test_J20_replayed_jti_is_refused(
    verifier: Verifier, per_request: TestIssuer, refused: Any, jti_store: Any
) -> None:
    token = per_request.mint(SUB, jti="once")
    assert verifier.verify(token).jti == "once"
    refused(verifier, token, "token already used")
    # A different token carrying the same jti is a replay too.
    refused(verifier, per_request.mint(SUB, jti="once", exp_in=200), "token already used")
    assert verifier.verify(per_request.mint(SUB, jti="twice")).jti == "twice"
    assert jti_store.calls == 4


def test_J20_store_keeps_the_jti_until_exp_plus_skew(
    verifier: Verifier, per_request: TestIssuer, clock: FakeClock, jti_store: Any
) -> None:
    verifier.verify(per_request.mint(SUB, jti="j", exp_in=120))
    expected = datetime.fromtimestamp(int(clock()) + 120 + 30, UTC)
    assert jti_store.seen == {("spire-rq", "j"): expected}


@pytest.mark.parametrize(
    ("jti", "detail"),
    [
        (OMIT, "token has no 'jti' claim"),
        (None, "token has no 'jti' claim"),
        ("", "single-use token needs a valid jti claim"),
        (42, "invalid jti claim"),
        ("j" * 257, "single-use token needs a valid jti claim"),
    ],
    ids=["missing", "null", "empty", "number", "too-long"],
)
def test_single_use_token_needs_a_jti(
    verifier: Verifier, per_request: TestIssuer, refused: Any, jti_store: Any, jti: Any, detail: str
) -> None:
    refused(verifier, per_request.mint(SUB, extra_claims={"jti": jti}), detail)
    assert jti_store.calls == 0


@pytest.mark.parametrize(
    "case",
    ["expired", "bad-signature", "wrong-audience", "bad-spiffe-id", "not-yet-valid"],
)
def test_jti_is_consumed_only_after_every_other_check(
    verifier: Verifier,
    per_request: TestIssuer,
    clock: FakeClock,
    refused: Any,
    jti_store: Any,
    case: str,
) -> None:
    # Otherwise a forged or stale token could burn a victim's jti.
    mint = per_request.mint
    if case == "bad-signature":
        head, body, _ = mint(SUB, jti="v").split(".")
        token = f"{head}.{body}.{mint(SUB, jti='w').split('.')[2]}"
    else:
        token = {
            "expired": lambda: mint(SUB, jti="v", exp_in=-60),
            "wrong-audience": lambda: mint(SUB, jti="v", aud="other"),
            "bad-spiffe-id": lambda: mint("spiffe://evil.org/x", jti="v"),
            "not-yet-valid": lambda: mint(SUB, jti="v", extra_claims={"nbf": int(clock()) + 600}),
        }[case]()
    refused(verifier, token)
    assert jti_store.calls == 0
    assert verifier.verify(per_request.mint(SUB, jti="v")).jti == "v"


def test_jtis_are_per_issuer(make_verifier: Any, tmp_path: Path, clock: FakeClock) -> None:
    a = TestIssuer.create(tmp_path, name="a", single_use=True, clock=clock)
    b = TestIssuer.create(tmp_path, name="b", single_use=True, clock=clock)
    verifier = make_verifier(a, b)
    assert verifier.verify(a.mint("alice", jti="same")).issuer_name == "a"
    assert verifier.verify(b.mint("alice", jti="same")).issuer_name == "b"


def test_reusable_issuer_does_not_touch_the_store(
    make_verifier: Any, tmp_path: Path, clock: FakeClock, jti_store: Any
) -> None:
    idp = TestIssuer.create(tmp_path, name="idp", clock=clock)
    verifier = make_verifier(idp)
    token = idp.mint("alice", jti="reused")
    assert verifier.verify(token).jti == "reused"
    assert verifier.verify(token).jti == "reused"
    assert verifier.verify(idp.mint("alice", jti=OMIT)).jti is None
    assert jti_store.calls == 0


@pytest.mark.parametrize("threads", [2, 16], ids=["J21-two-workers", "sixteen-threads"])
def test_J21_concurrent_replay_has_exactly_one_winner(
    verifier: Verifier, per_request: TestIssuer, threads: int
) -> None:
    token = per_request.mint(SUB, jti="race")
    barrier = threading.Barrier(threads)
    outcomes: list[str] = []
    lock = threading.Lock()

    def attempt() -> None:
        barrier.wait()
        try:
            verifier.verify(token)
            result = "ok"
        except InvalidToken as error:
            result = error.detail
        with lock:
            outcomes.append(result)

    workers = [threading.Thread(target=attempt) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=10)
    assert sorted(outcomes) == ["ok"] + ["token already used"] * (threads - 1)


def test_store_failure_propagates_instead_of_accepting(make_verifier: Any, per_request: TestIssuer) -> None:
    class BrokenStore:
        def claim(self, issuer_name: str, jti: str, expires_at: datetime) -> bool:
            raise ConnectionError("database down")

    verifier = make_verifier(per_request, store=BrokenStore())
    with pytest.raises(ConnectionError):
        verifier.verify(per_request.mint(SUB))
