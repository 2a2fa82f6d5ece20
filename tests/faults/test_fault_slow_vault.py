"""A Vault that accepts connections but never answers (overloaded, a half-dead node).

Against a real `broker serve` with gthread workers: starts fail with 503
`vault_unavailable` within a bound set by `vault.timeout_seconds` (generous: 3x), never
hang; meanwhile requests that don't need Vault (/healthz, GET /task/{id}) are answered
while the starts are still stuck, so slow Vault calls can't starve the workers; and the
replica is fine once Vault answers again. A finish under the same Vault answers 200 in
bounded time with its lease honestly `revoke_pending`, and the scheduler revokes it later.

The proxy holds requests without forwarding them, so Vault never acts on one the broker
gave up on. Each stuck start comes from a different workload: starts of one workload for
one task type are serialised on purpose (policy limits), which is a separate case.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from werkzeug.test import TestResponse

from broker.config import VaultSettings
from tests.factories import AGENT, start_body
from tests.support.tokens import TestIssuer
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

TIMEOUT = 5.0  # vault.timeout_seconds: wide enough that the "meanwhile" checks never race it
PROBES = 12  # requests that need no Vault, sent one by one while Vault-bound ones are stuck
OPEN = {"issuing", "active", "pending_approval"}
# Without a token pool every stuck start is exactly one stuck Vault call (if the build has one).
NO_POOL = {"task_token_pool": 0} if "task_token_pool" in VaultSettings.model_fields else {}


def agent(issuers: dict[str, TestIssuer], i: int) -> dict[str, str]:
    spire = issuers["spire"]
    return spire.bearer(spire.spiffe_id(f"agents/slow-{i}"))


def launch(processes, fault_config, vault_proxy, issuers, *, workers, threads, warm=1, vault_options=None):
    server = processes(
        fault_config(vault_addr=vault_proxy.addr, timeout=TIMEOUT, vault_options=vault_options),
        "serve",
        workers=workers,
        threads=threads,
        scheduler=True,
    )
    server.wait_healthy()
    headers = issuers["spire"].bearer(AGENT)
    started = [
        requests.post(f"{server.url}/task/start", json=start_body(), headers=headers, timeout=30)
        for _ in range(warm)
    ]
    assert [answer.status_code for answer in started] == [201] * warm, [answer.text for answer in started]
    return server, headers, [answer.json()["task_id"] for answer in started]


def timed(url, path, body, headers):
    began = time.monotonic()
    answer = requests.post(f"{url}{path}", json=body, headers=headers, timeout=60)
    return answer, time.monotonic() - began


def probe_while_stuck(url, headers, read_id, stuck):
    """/healthz and GET /task/{id} (no Vault needed) answer while every `stuck` is in flight."""
    for i in range(PROBES):
        if i % 2:
            answer = requests.get(f"{url}/task/{read_id}", headers=headers, timeout=30)
            assert answer.status_code == 200 and answer.json()["state"] == "active", answer.text
        else:
            assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
    done = sum(future.done() for future in stuck)
    assert done == 0, f"probes had to wait for {done} Vault-bound request(s) to time out first"


def assert_vault_unavailable(answer, elapsed, timeout=TIMEOUT):
    assert answer.status_code == 503, answer.text
    assert answer.json()["code"] == "vault_unavailable", answer.json()
    assert int(answer.headers["Retry-After"]) > 0
    assert "credentials" not in answer.json()
    assert elapsed < 3 * timeout, f"took {elapsed:.1f}s with vault.timeout_seconds={timeout}"


def test_slow_vault_fails_starts_and_finishes_in_bounded_time_without_starving_reads(
    issuers, vault_proxy, fault_config, processes, ledger
):
    """One gthread worker, more threads than stuck requests: the threads nobody's Vault
    call holds keep serving; each stuck request ends within the Vault timeout's bound."""
    server, headers, (read_id, finish_id) = launch(
        processes, fault_config, vault_proxy, issuers, workers=1, threads=6, warm=2
    )
    hang = vault_proxy.add_rule(r"", action="hang", times=None, hang_seconds=120)

    with ThreadPoolExecutor(5) as pool:
        starts = [
            pool.submit(timed, server.url, "/task/start", start_body(), agent(issuers, i)) for i in range(4)
        ]
        finish = pool.submit(timed, server.url, "/task/finish", {"task_id": finish_id}, headers)
        hang.wait_fired(5, timeout=30)  # Vault-bound requests are now waiting on Vault
        probe_while_stuck(server.url, headers, read_id, [*starts, finish])
        results = [future.result(timeout=60) for future in starts]
        finished, finish_elapsed = finish.result(timeout=60)

    for answer, elapsed in results:
        assert_vault_unavailable(answer, elapsed)
    # A finish can't wait for Vault forever either: it answers, and says the truth.
    assert finished.status_code == 200, finished.text
    assert finish_elapsed < 3 * TIMEOUT, f"finish took {finish_elapsed:.1f}s"
    [parked] = finished.json()["leases"]
    assert parked["state"] == "revoke_pending" and parked["last_error"], parked
    assert not any(ex.outcome == "answered" for ex in hang.fired)  # Vault never saw them
    others = [row for row in ledger.tasks() if str(row["id"]) not in (read_id, finish_id)]
    assert not [row for row in others if row["state"] in OPEN], others
    assert ledger.rows("SELECT * FROM leases WHERE task_id NOT IN (:a, :b)", a=read_id, b=finish_id) == []

    # Vault answers again: the parked lease is retried, and the same replica serves as usual.
    vault_proxy.clear_rules()
    vault_proxy.release()
    wait_for(
        lambda: {row["state"] for row in ledger.leases(finish_id)} == {"revoked"},
        what="the parked lease revoked by the scheduler's retry",
    )

    def recovered():
        answer = requests.post(f"{server.url}/task/start", json=start_body(), headers=headers, timeout=30)
        return answer.json() if answer.status_code == 201 else None

    fresh = wait_for(recovered, timeout=30, interval=0.5, what="starts work again")
    for task_id in (fresh["task_id"], read_id):
        done = requests.post(
            f"{server.url}/task/finish", json={"task_id": task_id}, headers=headers, timeout=30
        )
        assert done.status_code == 200
        assert {lease["state"] for lease in done.json()["leases"]} == {"revoked"}


def test_slow_vault_does_not_starve_reads_across_workers(
    issuers, vault_proxy, fault_config, processes, ledger
):
    """`broker serve --workers 2 --threads 4` with 7 requests stuck on Vault: one thread is
    still free in the replica, so /healthz and GET /task must be answered meanwhile."""
    workers, threads = 2, 4
    server, headers, (read_id,) = launch(
        processes, fault_config, vault_proxy, issuers, workers=workers, threads=threads, vault_options=NO_POOL
    )
    hang = vault_proxy.add_rule(r"", action="hang", times=None, hang_seconds=120)
    stuck_count = workers * threads - 1

    with ThreadPoolExecutor(stuck_count) as pool:
        stuck = [
            pool.submit(timed, server.url, "/task/start", start_body(), agent(issuers, i))
            for i in range(stuck_count)
        ]
        try:
            hang.wait_fired(stuck_count, timeout=TIMEOUT / 2)
            probe_while_stuck(server.url, headers, read_id, stuck)
        finally:
            vault_proxy.release()  # the stuck requests fail now instead of at their timeout
            results = [future.result(timeout=60) for future in stuck]
    assert all(answer.status_code == 503 for answer, _ in results)


def test_concurrent_starts_of_one_workload_against_a_slow_vault_say_vault_unavailable(
    issuers, vault_proxy, fault_config, in_process, ledger
):
    """docs/contract.md §6.9: without Vault nothing is issued, and the answer says why. Three starts of
    one workload at once while Vault hangs: each must say `vault_unavailable`."""
    timeout = 8.0  # longer than the database's lock_timeout (5 s)
    _, client = in_process(fault_config(vault_addr=vault_proxy.addr, timeout=timeout))
    headers = issuers["spire"].bearer(AGENT)
    vault_proxy.add_rule(r"", action="hang", times=None, hang_seconds=120)
    answers: list[tuple[TestResponse, float]] = []
    lock = threading.Lock()

    def start():
        began = time.monotonic()
        answer = client.post("/task/start", json=start_body(), headers=headers)
        with lock:
            answers.append((answer, time.monotonic() - began))

    threads = [threading.Thread(target=start) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    vault_proxy.release()

    codes = sorted(answer.get_json()["code"] for answer, _ in answers)
    assert codes == ["vault_unavailable"] * 3, codes
    for answer, elapsed in answers:
        assert answer.status_code == 503
        assert elapsed < 3 * timeout, elapsed
    assert not [row for row in ledger.tasks() if row["state"] in OPEN]


def test_a_finish_tries_vault_once_when_it_does_not_answer(
    issuers, vault_proxy, fault_config, processes, ledger
):
    """Four leases, Vault silent: the first revoke waits out the timeout, a one-second health
    probe gets no answer either, the other three are parked without a call (each would wait
    out its own timeout), and the retry revokes all four once Vault answers again."""
    server, headers, _ = launch(processes, fault_config, vault_proxy, issuers, workers=1, threads=2, warm=0)
    started = requests.post(
        f"{server.url}/task/start", json=start_body("everything"), headers=headers, timeout=30
    )
    assert started.status_code == 201, started.text
    task_id = started.json()["task_id"]
    hang = vault_proxy.add_rule(r"", action="hang", times=None, hang_seconds=120)

    finished = requests.post(
        f"{server.url}/task/finish", json={"task_id": task_id}, headers=headers, timeout=60
    )

    assert finished.status_code == 200, finished.text
    leases = finished.json()["leases"]
    assert [lease["state"] for lease in leases] == ["revoke_pending"] * 4
    revokes = [ex for ex in hang.fired if "/revoke" in ex.path]
    assert len(revokes) == 1  # one revoke reached Vault's address; the rest were never sent
    assert sum(lease["last_error"].startswith("not tried: ") for lease in leases) == 3
    vault_proxy.clear_rules()
    vault_proxy.release()
    wait_for(
        lambda: {row["state"] for row in ledger.leases(task_id)} == {"revoked"},
        what="every parked lease revoked by the scheduler's retry",
    )


def test_one_slow_revoke_does_not_keep_the_others_from_being_tried(
    issuers, vault_proxy, fault_config, processes, ledger
):
    """Vault answers but one revoke times out (its engine's backend is slow): the health
    probe answers, so the task's other leases are still revoked at once."""
    server, headers, _ = launch(processes, fault_config, vault_proxy, issuers, workers=1, threads=2, warm=0)
    started = requests.post(
        f"{server.url}/task/start", json=start_body("everything"), headers=headers, timeout=30
    )
    assert started.status_code == 201, started.text
    task_id = started.json()["task_id"]
    slow = vault_proxy.add_rule(r"^/v1/sys/leases/revoke", action="hang", times=1, hang_seconds=120)

    finished = requests.post(
        f"{server.url}/task/finish", json={"task_id": task_id}, headers=headers, timeout=60
    )

    assert finished.status_code == 200, finished.text
    states = sorted(lease["state"] for lease in finished.json()["leases"])
    assert states == ["revoke_pending", "revoked", "revoked", "revoked"], finished.json()["leases"]
    assert len(slow.fired) == 1
    assert ledger.events("lease.revoke_deferred", task_id) == []
    vault_proxy.release()
    wait_for(
        lambda: {row["state"] for row in ledger.leases(task_id)} == {"revoked"},
        what="the slow lease revoked by the scheduler's retry",
    )
