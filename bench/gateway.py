#!/usr/bin/env python3
"""The gateway beside a direct connection, in one run: `bench/gateway.py [--rounds N]`.

One throwaway stack and one `broker serve` with its gateway (a process of its own, as in
production). Two tasks of the same database role: one `direct` (the workload holds the
password) and one `gateway` (it holds a handle). Each figure is measured on both, round by
round and interleaved, so the box's drift falls on both sides alike; medians over rounds:
- `SELECT 1` round trip, p50 over a round's queries (target: gateway <= direct + 0.5 ms);
- connection setup, connect + first `SELECT 1` + close, p50 (target: gateway <= 15 ms);
- a 50 MB `COPY (...) TO STDOUT`, MB/s (target: gateway >= 0.5x direct);
- the gateway's RSS for 200 idle sessions (target: <= 100 MB).
Writes bench/results/gateway-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VENV_PYTHON = HERE.parent / ".venv" / "bin" / "python"
if VENV_PYTHON.exists() and Path(sys.prefix).resolve() != VENV_PYTHON.parent.parent.resolve():
    os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), str(Path(__file__).resolve()), *sys.argv[1:]])
sys.path.insert(0, str(HERE))

import psycopg  # noqa: E402
import yaml  # noqa: E402
from harness import BIG, ISSUER_NAME, TRUST_DOMAIN, Http, bench_stack, median, pct, progress, spiffe  # noqa: E402

DIRECT, GATEWAY = "analytics-direct", "analytics-gateway"
COPY_MB = 50
# 100-character rows: ~50 MB of CopyData, computed by the server (no table to fill).
COPY_SQL = f"COPY (SELECT repeat('x', 99) FROM generate_series(1, {COPY_MB * 10_000})) TO STDOUT"
IDLE_SESSIONS = 200


def policy(upstream_port: int) -> dict[str, Any]:
    def task(credential: dict[str, Any]) -> dict[str, Any]:
        return {
            "description": "Read the analytics database (gateway benchmark)",
            "ttl": {"default": 3600, "max": 3600},
            "workloads": [{"issuer": ISSUER_NAME, "subject": f"spiffe://{TRUST_DOMAIN}/agents/*"}],
            "owners": ["*@example.com"],
            "limits": {"max_active_per_workload": BIG, "max_starts_per_minute": BIG},
            "credentials": {"db": credential},
        }

    gateway = {
        "kind": "database", "role": "analytics-ro", "delivery": "gateway",
        "upstream": {"host": "127.0.0.1", "port": upstream_port, "dbname": "analytics"},
        # Rules of the shape a real policy has, so their cost is in the figures.
        "statements": [
            {"name": "read-only", "when": 'statement.command in ["SELECT", "COPY", "SHOW"]'},
            {"name": "analytics-only", "when": 'statement.tables.all(t, t.startsWith("analytics."))'},
        ],
    }  # fmt: skip
    return {
        "tasks": {
            DIRECT: task({"kind": "database", "role": "analytics-ro"}),
            GATEWAY: task(gateway),
        }
    }


def wait_for_port(host: str, port: int, timeout: float = 60) -> None:
    """`broker serve` starts its gateway beside the API: it listens a moment later."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the gateway never listened on {host}:{port}")


def start(http: Http, token: str, task: str) -> dict[str, Any]:
    body = {"task": task, "owner": "alice@example.com", "purpose": "gateway benchmark"}
    answer: dict[str, Any] = http.call(
        "POST", "/task/start", body=body, headers={"Authorization": f"Bearer {token}"}, expect=(201,)
    )
    return dict(answer["credentials"]["db"]["data"])


def connector(data: dict[str, Any], host: str, port: int) -> Callable[[], psycopg.Connection[Any]]:
    def connect() -> psycopg.Connection[Any]:
        return psycopg.connect(
            host=host, port=port, user=data["username"], password=data["password"], dbname="analytics",
            sslmode="disable", autocommit=True,
        )  # fmt: skip

    return connect


def round_trip_ms(connect: Callable[[], psycopg.Connection[Any]], queries: int) -> float:
    with connect() as connection:
        connection.execute("SELECT 1")
        times = []
        for _ in range(queries):
            started = time.perf_counter()
            connection.execute("SELECT 1").fetchone()
            times.append((time.perf_counter() - started) * 1000)
    return pct(times, 50)


def setup_ms(connect: Callable[[], psycopg.Connection[Any]], count: int) -> float:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        with connect() as connection:
            connection.execute("SELECT 1").fetchone()
        times.append((time.perf_counter() - started) * 1000)
    return pct(times, 50)


def copy_mb_per_s(connect: Callable[[], psycopg.Connection[Any]]) -> float:
    with connect() as connection, connection.cursor() as cursor:
        received = 0
        started = time.perf_counter()
        with cursor.copy(COPY_SQL) as copy:
            for chunk in copy:
                received += len(chunk)
        elapsed = time.perf_counter() - started
    return received / 1e6 / elapsed


def gateway_pid(config: Path) -> int:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"gateway" in argv and str(config).encode() in argv:
                return int(entry.name)
    raise RuntimeError("no gateway process found")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.contextmanager
def idle(connect: Callable[[], psycopg.Connection[Any]], count: int) -> Iterator[None]:
    connections = [connect() for _ in range(count)]
    try:
        for connection in connections:
            connection.execute("SELECT 1")
        yield
    finally:
        for connection in connections:
            connection.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--queries", type=int, default=500, help="SELECT 1 per side per round")
    parser.add_argument("--connects", type=int, default=30, help="connections per side per round")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the stack's temp dir (logs)")
    args = parser.parse_args()
    from broker.dev.stack.postgres import free_port

    with bench_stack(keep=args.keep) as bench:
        gateway_port = free_port()
        bench.policy_path.write_text(yaml.safe_dump(policy(bench.stack.postgres.port)))
        config = yaml.safe_load(bench.config_path.read_text())
        config["gateway"] = {"postgres_bind": f"127.0.0.1:{gateway_port}", "advertise_host": "127.0.0.1"}
        bench.config_path.write_text(yaml.safe_dump(config))
        server = bench.serve(scheduler=False)
        http = Http(server.url)
        token = bench.issuer.mint(spiffe("bench"))
        direct = connector(start(http, token, DIRECT), "127.0.0.1", bench.stack.postgres.port)
        handle = start(http, token, GATEWAY)
        gateway = connector(handle, str(handle["host"]), int(handle["port"]))
        wait_for_port(str(handle["host"]), int(handle["port"]))
        progress(f"warm-up (the gateway on {handle['port']} issues its credential on first connect)")
        for side in (direct, gateway):
            round_trip_ms(side, 50)
            setup_ms(side, 3)
        rounds: list[dict[str, float]] = []
        for number in range(1, args.rounds + 1):
            row = {
                "rtt_direct": round_trip_ms(direct, args.queries),
                "rtt_gateway": round_trip_ms(gateway, args.queries),
                "setup_direct": setup_ms(direct, args.connects),
                "setup_gateway": setup_ms(gateway, args.connects),
                "copy_direct": copy_mb_per_s(direct),
                "copy_gateway": copy_mb_per_s(gateway),
            }
            rounds.append(row)
            progress(
                f"round {number}: SELECT 1 {row['rtt_direct']:.3f} / {row['rtt_gateway']:.3f} ms,"
                f" setup {row['setup_direct']:.1f} / {row['setup_gateway']:.1f} ms,"
                f" COPY {row['copy_direct']:.0f} / {row['copy_gateway']:.0f} MB/s (direct / gateway)"
            )
        pid = gateway_pid(bench.config_path)
        before = rss_mb(pid)
        with idle(gateway, IDLE_SESSIONS):
            time.sleep(1)
            during = rss_mb(pid)
        http.close()

    def med(key: str) -> float:
        return median([row[key] for row in rounds])

    def spread(key: str) -> str:
        values = [row[key] for row in rounds]
        return f"{min(values):.3g}-{max(values):.3g}"

    rtt_delta = median([row["rtt_gateway"] - row["rtt_direct"] for row in rounds])
    copy_ratio = median([row["copy_gateway"] / row["copy_direct"] for row in rounds])
    idle_cost = during - before
    figures = [
        ("SELECT 1 p50, ms", med("rtt_direct"), med("rtt_gateway"), f"+{rtt_delta:.3f} ms", rtt_delta <= 0.5,
         "<= direct + 0.5 ms", spread("rtt_gateway")),
        ("connection setup p50, ms", med("setup_direct"), med("setup_gateway"), "",
         med("setup_gateway") <= 15, "<= 15 ms", spread("setup_gateway")),
        (f"COPY {COPY_MB} MB TO STDOUT, MB/s", med("copy_direct"), med("copy_gateway"), f"x{copy_ratio:.2f}",
         copy_ratio >= 0.5, ">= 0.5x direct", spread("copy_gateway")),
        (f"gateway RSS for {IDLE_SESSIONS} idle sessions, MB", float("nan"), idle_cost,
         f"{before:.0f} -> {during:.0f} MB", idle_cost <= 100, "<= 100 MB", ""),
    ]  # fmt: skip
    print(f"\ngateway beside direct, {args.rounds} rounds (medians over rounds; gateway's range)\n")
    print(f"{'figure':40} {'direct':>9} {'gateway':>9} {'':>16}  {'target':>18}  met  range")
    for name, plain, gated, note, met, target, ranged in figures:
        plain_text = "" if plain != plain else f"{plain:9.3g}"
        verdict = "yes" if met else "NO "
        print(f"{name:40} {plain_text:>9} {gated:9.3g} {note:>16}  {target:>18}  {verdict}  {ranged}")
    results = {
        "rounds": rounds,
        "select1_delta_ms": rtt_delta,
        "copy_ratio": copy_ratio,
        "setup_gateway_p50_ms": med("setup_gateway"),
        "idle_rss_mb": {"before": before, "during": during, "sessions": IDLE_SESSIONS},
        "python": sys.version.split()[0],
    }
    path = args.json or HERE / "results" / f"gateway-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
