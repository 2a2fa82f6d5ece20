"""The Postgres gateway's cost: the same client directly against Postgres and through it.

    .venv/bin/python bench/gateway_wire.py [--rounds 5] [--pings 2000] [--copy-mb 50] [--connects 40]

One throwaway embedded Postgres, one gateway in a child process (so it doesn't share the
client's GIL), psycopg 3 as the client. Each round measures, direct and through the
gateway (the order alternating between rounds, since the machine is shared):

- `SELECT 1` round trip: p50 over `--pings` calls on one open connection;
- `COPY blob TO STDOUT` of a `--copy-mb` table: MB/s;
- connection setup (connect + first ReadyForQuery + close): p50 over `--connects`.

The table shows the medians of the rounds' figures and the gateway/direct ratio, plus the
gateway process's CPU seconds per 100 MB copied.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg

ROLE = "bench_gw"
DATABASE = "bench_gw"
ROW = 100  # bytes per COPY line, newline included


def serve() -> None:
    """`--serve`: run a gateway for one handle (JSON on stdin) until stdin closes."""
    import asyncio
    from collections.abc import Mapping

    from broker.gateway.pgproxy import GatewayServer, Login, Upstream, Verdict
    from broker.gateway.scram import make_verifier

    spec = json.loads(sys.stdin.readline())
    login = Login("bench", make_verifier(spec["secret"]))
    upstream = Upstream(**spec["upstream"])

    class Hooks:
        async def lookup(self, user: str, database: str) -> Login | None:
            return login if user == spec["handle"] else None

        async def open_upstream(self, login: Login) -> Upstream:
            return upstream

        def inspect(self, login: Login, sql: str) -> Verdict:
            return Verdict.refuse("no DROP") if "DROP" in sql.upper() else Verdict.allow()

        async def closed(self, login: Login, reason: str) -> None:
            pass

        def event(self, kind: str, login: Login | None, detail: Mapping[str, str]) -> None:
            pass

    async def main() -> None:
        server = GatewayServer("127.0.0.1", 0, Hooks())
        await server.start()
        print(server.port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await server.stop()

    asyncio.run(main())


def prepare(port: int, copy_mb: int) -> str:
    password = secrets.token_urlsafe(18)
    admin = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{password}'")
        conn.execute(f"CREATE DATABASE {DATABASE} OWNER {ROLE}")
    rows = copy_mb * 1_000_000 // ROW
    with psycopg.connect(
        f"host=127.0.0.1 port={port} user=postgres dbname={DATABASE}", autocommit=True
    ) as conn:
        # id (7 digits) + tab + text + newline = ROW bytes a line.
        conn.execute("CREATE TABLE blob (id int, body text)")
        conn.execute(
            "INSERT INTO blob SELECT g, repeat('x', %s) FROM generate_series(1000000, 1000000 + %s - 1) g",
            (ROW - 9, rows),
        )
        conn.execute(f"ALTER TABLE blob OWNER TO {ROLE}")
        conn.execute("VACUUM ANALYZE blob")
    return password


def start_gateway(pg_port: int, password: str) -> tuple[subprocess.Popen[str], int, str, str]:
    handle, secret = f"h_{secrets.token_hex(8)}", secrets.token_urlsafe(24)
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdin is not None and proc.stdout is not None
    upstream = {"host": "127.0.0.1", "port": pg_port, "dbname": DATABASE, "user": ROLE, "password": password}
    proc.stdin.write(json.dumps({"handle": handle, "secret": secret, "upstream": upstream}) + "\n")
    proc.stdin.flush()
    return proc, int(proc.stdout.readline()), handle, secret


def cpu_seconds(pid: int) -> float:
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def p50(call: Callable[[], object], n: int) -> float:
    timings = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def ping(dsn: str, n: int) -> float:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(50):
            conn.execute("SELECT 1")
        return p50(lambda: conn.execute("SELECT 1").fetchone(), n)


def copy_out(dsn: str) -> tuple[float, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        started = time.perf_counter()
        total = 0
        with conn.cursor().copy("COPY blob TO STDOUT") as copy:
            for chunk in copy:
                total += len(chunk)
        return time.perf_counter() - started, total


def connect_once(dsn: str) -> None:
    psycopg.connect(dsn).close()


def one_round(
    dsns: dict[str, str], args: argparse.Namespace, order: list[str], gw_pid: int
) -> dict[str, Any]:
    result: dict[str, Any] = {name: {} for name in dsns}
    for name in order:
        result[name]["ping_us"] = ping(dsns[name], args.pings) * 1e6
    for name in order:
        before = cpu_seconds(gw_pid)
        seconds, size = copy_out(dsns[name])
        result[name]["copy_mb_s"] = size / seconds / 1e6
        if name == "gateway":
            result[name]["gw_cpu_s_per_100mb"] = (cpu_seconds(gw_pid) - before) / size * 1e8
    for name in order:
        result[name]["connect_ms"] = p50(lambda n=name: connect_once(dsns[n]), args.connects) * 1e3
    return result


def report(rounds: list[dict[str, Any]]) -> None:
    rows = [
        ("SELECT 1 p50 (µs)", "ping_us"),
        ("COPY TO STDOUT (MB/s)", "copy_mb_s"),
        ("connect p50 (ms)", "connect_ms"),
    ]
    print(f"{'':26} {'direct':>10} {'gateway':>10} {'gw/direct':>10}   (medians of {len(rounds)} rounds)")
    for label, key in rows:
        direct = statistics.median(r["direct"][key] for r in rounds)
        gateway = statistics.median(r["gateway"][key] for r in rounds)
        ratios = [r["gateway"][key] / r["direct"][key] for r in rounds]
        print(f"{label:26} {direct:10.1f} {gateway:10.1f} {statistics.median(ratios):10.2f}")
    cpu = statistics.median(r["gateway"]["gw_cpu_s_per_100mb"] for r in rounds)
    print(f"gateway CPU per 100 MB copied: {cpu:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pings", type=int, default=2000)
    parser.add_argument("--copy-mb", type=int, default=50)
    parser.add_argument("--connects", type=int, default=40)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve()

    from broker.dev.stack.postgres import start_postgres

    with tempfile.TemporaryDirectory(prefix="bench-gw-") as tmp:
        Path(tmp).chmod(0o755)
        pg = start_postgres(Path(tmp) / "pg")
        try:
            print("preparing", file=sys.stderr)
            password = prepare(pg.port, args.copy_mb)
            proc, gw_port, handle, secret = start_gateway(pg.port, password)
            common = f"host=127.0.0.1 dbname={DATABASE} sslmode=disable"
            dsns = {
                "direct": f"{common} port={pg.port} user={ROLE} password={password}",
                "gateway": f"{common} port={gw_port} user={handle} password={secret}",
            }
            rounds = []
            for i in range(args.rounds):
                order = ["direct", "gateway"] if i % 2 == 0 else ["gateway", "direct"]
                rounds.append(one_round(dsns, args, order, proc.pid))
                print(f"round {i + 1}/{args.rounds}: {json.dumps(rounds[-1])}", file=sys.stderr)
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(10)
            report(rounds)
        finally:
            pg.stop()


if __name__ == "__main__":
    main()
