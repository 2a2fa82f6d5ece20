"""CPU that OpenBao and Postgres spend on each kind of Vault call the broker and a peer make.

    .venv/bin/python bench/vault_calls.py [--calls 200] [--rounds 3]

On one throwaway stack (as bench/run), one client thread makes `--calls` calls of each
kind in turn, `--rounds` times, and reads the CPU time (utime + stime, /proc) of the
OpenBao server and of every Postgres process around each block. Printed per call, median
over the rounds: OpenBao ms, Postgres ms (the database engine's CREATE/DROP ROLE land
here), wall ms. It tells what no broker can save: a peer's read + revoke costs the same
Vault and Postgres work as the broker's, so only the rest is the broker's to cut.

Kinds: `task token create` (through the task token role, as the pool mints), `creds read`
(database/creds with that token), `lease revoke` (sync), `token revoke` (by accessor),
`peer jwt login` (what an agent does instead of a task token).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import BenchStack, Flows, bench_stack, cpu_seconds, median, progress, spiffe


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pids(match: Callable[[str], bool]) -> list[int]:
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and match(_cmdline(int(entry.name)))
    ]


def _cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def measure(stack: BenchStack, calls: int, rounds: int) -> dict[str, dict[str, float]]:
    from broker.config import load_settings
    from broker.services import build_services
    from broker.tasks.token_pool import TaskTokenPool

    port = stack.vault_addr.rsplit(":", 1)[1]
    bao = _pids(lambda cmd: "server -dev" in cmd and f"127.0.0.1:{port}" in cmd)
    services = build_services(load_settings(str(stack.config_path)))
    gateway = services.vault
    compiled = services.policies.snapshot().policy.task("analytics-read")
    spec = next(iter(compiled.credentials.values()))
    pool = TaskTokenPool(gateway, depth=0)
    peer = Flows("http://127.0.0.1:9", stack.vault_addr, stack.issuer.mint(spiffe("vault-calls")))
    results: dict[str, list[tuple[float, float, float]]] = {}

    def block(label: str, step: Callable[[Any], Any], inputs: list[Any]) -> list[Any]:
        postgres = _pids(lambda cmd: cmd.startswith("postgres"))
        bao_before, pg_before, began = _cpu(bao), _cpu(postgres), time.perf_counter()
        outputs = [step(item) for item in inputs]
        wall = time.perf_counter() - began
        postgres_after = _pids(lambda cmd: cmd.startswith("postgres"))
        pg_used = _cpu(postgres_after) - pg_before  # backends Vault opened meanwhile count from 0
        per_call = ((_cpu(bao) - bao_before) * 1000 / calls, pg_used * 1000 / calls, wall * 1000 / calls)
        results.setdefault(label, []).append(per_call)
        return outputs

    try:
        for index in range(rounds):
            progress(f"round {index + 1}/{rounds}: {calls} calls of each kind")
            slots = [None] * calls

            def mint(_: Any) -> Any:
                return pool.take(
                    task=compiled.name, specs=compiled.credentials, ttl_max=compiled.ttl_max, ttl_needed=300
                )

            tokens = block("task token create", mint, slots)
            secrets = block(
                "creds read",
                lambda token: gateway.issue(token, spec, ttl_seconds=300, task_id="bench", workload="bench"),
                tokens,
            )
            block("lease revoke (sync)", lambda secret: gateway.revoke(secret.handle), secrets)
            block("token revoke", lambda token: gateway.revoke_task_token(token.accessor), tokens)
            block("peer jwt login", lambda _: peer.peer_login(), slots)
    finally:
        pool.close()
        peer.close()
        services.close()
    return {
        label: {
            "openbao_ms": median([r[0] for r in rows]),
            "postgres_ms": median([r[1] for r in rows]),
            "wall_ms": median([r[2] for r in rows]),
        }
        for label, rows in results.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with bench_stack() as stack:
        table = measure(stack, args.calls, args.rounds)
    print(
        f"{'call':<22} {'OpenBao ms':>10} {'Postgres ms':>11} {'wall ms':>8}   (per call, median of rounds)"
    )
    for label, row in table.items():
        print(f"{label:<22} {row['openbao_ms']:>10.2f} {row['postgres_ms']:>11.2f} {row['wall_ms']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
