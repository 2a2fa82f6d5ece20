"""The broker benchmark behind `bench/run` (`make bench`): one stack, one table, one JSON.

What it measures, on ONE throwaway stack (embedded Postgres + OpenBao dev server + one
`broker serve` with its scheduler), with the flows interleaved round by round so that
drift on a shared machine hits all of them alike:

- latency, one client, sequential: *peer* (JWT login to OpenBao, read
  `database/creds/analytics-ro`, revoke the lease with sync=true), *floor* (read + revoke
  with a ready token) and *broker* (`POST /task/start` + `POST /task/finish` of a
  one-credential task); p50/p95, the broker's overhead (broker p50 - peer p50) and the
  broker/peer and broker/floor ratios (the median of the per-round figures, with their range);
- throughput with 8 concurrent clients (separate processes, one workload identity each),
  closed loop, broker and peer, alternating which goes first, with the CPU every process
  used per op (/proc): the broker's own is its workers', scheduler's and database's;
- revocation lag (lease revoked_at - task expires_at, from the broker's Postgres) for
  tasks nobody finishes: some expire while the 8-client load runs, some on an idle broker;
- an expiry storm: N tasks (1,000) given one common deadline, time until all are revoked;
- the scheduler's due-task and retry queries with EXPLAIN ANALYZE at 100,000 task and lease
  rows (synthetic rows inserted after the live measurements, the broker stopped first);
- RSS (VmRSS, VmHWM) of each gunicorn worker and of the scheduler process.

Run:  .venv/bin/python bench/run [--rounds N] [--quick] [--json PATH]   (or `make bench`)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

from clients import ClientPool
from harness import (
    OWN_GROUPS,
    ROOT,
    BenchStack,
    CpuMeter,
    Flows,
    bench_stack,
    gunicorn_workers,
    median,
    pct,
    process_groups,
    progress,
    spiffe,
    status_kb,
)

TARGETS = {
    "overhead_ms": 8.0,  # at most: broker p50 - peer p50, one client
    "own_cpu_ms": 4.0,  # at most: workers + scheduler + the broker's Postgres, per op at 8 clients
    "broker_peer_p50_ratio": 1.25,  # at most
    "throughput_ratio": 0.80,  # at least
    "storm_seconds": 3.0,  # at most
    "worker_rss_mb": 150.0,  # at most
}
FLOWS = ("peer", "floor", "broker")


# -- options -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run", description="Credential Broker benchmark: one stack, one table, one JSON."
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5; --quick 2)")
    parser.add_argument("--quick", action="store_true", help="small numbers: a smoke run in < 60 s")
    parser.add_argument("--json", type=Path, help="write the JSON here (default bench/results/<ts>.json)")
    parser.add_argument("--ops", type=int, help="sequential ops per flow per round (default 40)")
    parser.add_argument("--duration", type=float, help="seconds per 8-client throughput slot (default 10)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--storm", type=int, help="tasks in the expiry storm (default 1000)")
    parser.add_argument("--rows", type=int, help="task and lease rows for the query plans (default 100000)")
    parser.add_argument(
        "--lag-tasks", type=int, help="unfinished tasks expiring during the load (default 60)"
    )
    parser.add_argument("--idle-lag-tasks", type=int, help="unfinished tasks expiring when idle (default 30)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2)")
    parser.add_argument("--threads", type=int, default=4, help="threads per worker (default 4)")
    parser.add_argument("--sweep", type=float, default=1.0, help="scheduler sweep interval, s (default 1)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the stack's temp dir")
    parser.add_argument("--fail-on-miss", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    full = {"rounds": 5, "ops": 40, "duration": 10.0, "storm": 1000, "rows": 100_000,
            "lag_tasks": 60, "idle_lag_tasks": 30}  # fmt: skip
    quick = {"rounds": 2, "ops": 8, "duration": 3.0, "storm": 100, "rows": 10_000,
             "lag_tasks": 8, "idle_lag_tasks": 6}  # fmt: skip
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# -- phases ----------------------------------------------------------------------------------


def sequential_block(flows: Flows, flow: str, ops: int) -> list[float]:
    samples = []
    for _ in range(ops):
        began = time.perf_counter()
        flows.run(flow)
        samples.append(time.perf_counter() - began)
    return samples


def rss_sample(master: int) -> dict[str, Any]:
    workers, schedulers = gunicorn_workers(master)

    def mb(pid: int, key: str) -> float:
        return (status_kb(pid, key) or 0) / 1024

    return {
        "workers": {pid: {"rss_mb": mb(pid, "VmRSS"), "hwm_mb": mb(pid, "VmHWM")} for pid in workers},
        "scheduler": {pid: {"rss_mb": mb(pid, "VmRSS"), "hwm_mb": mb(pid, "VmHWM")} for pid in schedulers},
        "master_rss_mb": mb(master, "VmRSS"),
    }


def lag_rows(conn: Any, task_ids: list[str]) -> list[dict[str, Any]]:
    rows = conn.execute(
        """
        SELECT t.id::text, t.state, extract(epoch FROM t.expires_at), l.state,
               extract(epoch FROM l.revoked_at - t.expires_at)
        FROM tasks t LEFT JOIN leases l ON l.task_id = t.id
        WHERE t.id = ANY(%s::uuid[])
        """,
        (task_ids,),
    ).fetchall()
    return [
        {
            "task_id": r[0],
            "task_state": r[1],
            "expires_at": float(r[2]),
            "lease_state": r[3],
            "lag": None if r[4] is None else float(r[4]),
        }
        for r in rows
    ]


def wait_revoked(conn: Any, task_ids: list[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        (left,) = conn.execute(
            "SELECT count(*) FROM leases WHERE task_id = ANY(%s::uuid[]) AND state <> 'revoked'",
            (task_ids,),
        ).fetchone()
        if left == 0:
            return True
        time.sleep(0.1)
    return False


def lag_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    lags = [r["lag"] for r in rows if r["lag"] is not None]
    return {
        "tasks": len(rows),
        "revoked": len(lags),
        "missed": len(rows) - len(lags),
        "p50_s": median(lags),
        "p99_s": pct(lags, 99),
        "max_s": max(lags) if lags else float("nan"),
        "over_2s": sum(1 for lag in lags if lag > 2.0),
    }


def storm(stack: BenchStack, pool: ClientPool, conn: Any, count: int, ttl: int) -> dict[str, Any]:
    progress(f"storm: starting {count} tasks with {len(pool)} clients (ttl {ttl} s)")
    began = time.monotonic()
    task_ids = pool.start_many(count, ttl)
    created_in = time.monotonic() - began
    progress(
        f"storm: {len(task_ids)} tasks active after {created_in:.1f} s; moving all deadlines to one instant"
    )
    (deadline,) = conn.execute(
        """
        UPDATE tasks SET expires_at = date_trunc('second', now()) + interval '3 seconds'
        WHERE id = ANY(%s::uuid[]) RETURNING extract(epoch FROM expires_at)
        """,
        (task_ids,),
    ).fetchone()
    deadline = float(deadline)
    cleared = wait_revoked(conn, task_ids, timeout=180)
    (expired, revoked, last, first) = conn.execute(
        """
        SELECT count(*) FILTER (WHERE t.state = 'expired'),
               count(*) FILTER (WHERE l.state = 'revoked'),
               extract(epoch FROM max(l.revoked_at)), extract(epoch FROM min(l.revoked_at))
        FROM tasks t JOIN leases l ON l.task_id = t.id WHERE t.id = ANY(%s::uuid[])
        """,
        (task_ids,),
    ).fetchone()
    rows = lag_rows(conn, task_ids)
    result = {
        "tasks": len(task_ids),
        "created_in_s": created_in,
        "create_rate_per_s": len(task_ids) / created_in if created_in else float("nan"),
        "all_revoked": cleared,
        "expired": expired,
        "revoked": revoked,
        "cleared_s": (float(last) - deadline) if last is not None else float("nan"),
        "first_revoke_s": (float(first) - deadline) if first is not None else float("nan"),
        "lag": lag_summary(rows),
    }
    progress(
        f"storm: {revoked}/{len(task_ids)} revoked, all cleared "
        f"{result['cleared_s']:.2f} s after the deadline"
    )
    return result


# -- query plans at scale --------------------------------------------------------------------


def scheduler_queries() -> dict[str, str]:
    """The scheduler's claim queries, built the way broker/scheduler/jobs.py builds them."""
    from datetime import timedelta

    from sqlalchemy.dialects import postgresql

    from broker.ledger import USAGE_QUERY, due_retry, due_tasks, spent_token, stuck_start

    def sql(statement: Any) -> str:
        return str(statement.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))

    due = due_tasks(1).with_for_update(skip_locked=True)
    retry = due_retry().with_for_update(skip_locked=True)
    reconcile = stuck_start(timedelta(0)).with_for_update(skip_locked=True)
    retire = spent_token().with_for_update(skip_locked=True)
    # The limits count a start runs under its workload's lock, as broker/ledger/tasks.py sends it.
    usage = USAGE_QUERY.replace("%(workload)s", "'__WORKLOAD__'").replace("%(task)s", "'analytics-read'")
    return {
        "due": sql(due), "retry": sql(retry), "reconcile": sql(reconcile), "retire": sql(retire),
        "usage_active": usage,
    }  # fmt: skip


SYNTHETIC_TASKS = """
INSERT INTO tasks (id, task, state, workload, workload_issuer, owner, purpose, context, ttl_seconds,
                   request_hash, created_at, expires_at, finished_at, outcome, end_reason,
                   token_accessor, token_revoked_at)
SELECT gen_random_uuid(), 'analytics-read',
       CASE WHEN g %% 100 = 0 THEN 'active' WHEN g %% 3 = 0 THEN 'expired' ELSE 'finished' END,
       'spiffe://example.org/agents/synthetic-' || (g %% 500), 'spire', 'synthetic@example.com',
       'synthetic row for the query-plan benchmark', '{}'::jsonb, 300,
       md5(g::text) || md5((g + 1)::text),
       now() - make_interval(secs => g * 2),
       CASE WHEN g %% 10000 = 0 THEN now() - interval '1 second'           -- a few due
            WHEN g %% 100 = 0 THEN now() + make_interval(secs => 60 + g %% 840) -- active, not due
            ELSE now() - make_interval(secs => g * 2 - 300) END,
       CASE WHEN g %% 100 = 0 THEN NULL ELSE now() - make_interval(secs => g * 2 - 30) END,
       CASE WHEN g %% 100 = 0 THEN NULL ELSE 'succeeded' END,
       CASE WHEN g %% 100 = 0 THEN NULL ELSE 'synthetic' END,
       'synthetic.' || g,
       CASE WHEN g %% 100 = 0 THEN NULL ELSE now() - make_interval(secs => g * 2 - 30) END
FROM generate_series(1, %s) AS g
"""

SYNTHETIC_LEASES = """
INSERT INTO leases (id, task_id, task, name, kind, workload, owner, purpose, state, issued_at,
                    expires_at, revoked_at, revoke_reason, revoke_attempts, last_error,
                    next_attempt_at, revoke_kind, revoke_ref, vault_lease_id)
SELECT gen_random_uuid(), t.id, t.task, 'db', 'database', t.workload, t.owner, t.purpose,
       CASE WHEN t.state = 'active' THEN 'active'
            WHEN n % 2000 = 1 THEN 'revoke_pending' ELSE 'revoked' END,
       t.created_at, t.expires_at,
       CASE WHEN t.state = 'active' OR n % 2000 = 1 THEN NULL ELSE t.finished_at END,
       CASE WHEN t.state = 'active' THEN NULL ELSE 'synthetic' END,
       CASE WHEN t.state = 'active' THEN 0 ELSE 1 END,
       CASE WHEN n % 2000 = 1 AND t.state <> 'active' THEN 'vault unavailable' END,
       CASE WHEN n % 2000 = 1 AND t.state <> 'active'
            THEN now() + make_interval(secs => (n % 7) * 60 - 30) END,
       'lease', 'database/creds/analytics-ro/synthetic' || n, 'database/creds/analytics-ro/synthetic' || n
FROM (SELECT id, task, workload, owner, purpose, state, created_at, expires_at, finished_at,
             row_number() OVER () AS n
      FROM tasks WHERE workload LIKE 'spiffe://example.org/agents/synthetic-%') AS t
"""

_INDEX = re.compile(r"(Index Only Scan|Index Scan|Bitmap Index Scan) (?:Backward )?(?:using|on) (\w+)")
_SEQ = re.compile(r"Seq Scan on (\w+)")
_EXEC = re.compile(r"Execution Time: ([\d.]+) ms")


def explain(conn: Any, query: str, repeats: int) -> dict[str, Any]:
    times, plan = [], ""
    for _ in range(repeats):
        rows = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + query).fetchall()
        conn.rollback()  # FOR UPDATE took row locks; give them back
        plan = "\n".join(row[0] for row in rows)
        found = _EXEC.search(plan)
        if found:
            times.append(float(found.group(1)))
    return {
        "query": query,
        "plan": plan,
        "indexes": sorted({m.group(2) for m in _INDEX.finditer(plan)}),
        "seq_scans": sorted(set(_SEQ.findall(plan))),
        "execution_ms_median": median(times),
        "execution_ms_all": times,
    }


def query_plans(stack: BenchStack, rows: int, busiest: str | None) -> dict[str, Any]:
    import psycopg

    with stack.connect() as conn:
        (existing,) = conn.execute("SELECT count(*) FROM tasks").fetchone()
        extra = max(0, rows - existing)
        progress(f"plans: inserting {extra} synthetic tasks + leases ({existing} real rows already)")
        began = time.monotonic()
        conn.execute(SYNTHETIC_TASKS % extra)
        conn.execute(SYNTHETIC_LEASES)
        conn.execute("ANALYZE tasks")
        conn.execute("ANALYZE leases")
        (tasks,) = conn.execute("SELECT count(*) FROM tasks").fetchone()
        (leases,) = conn.execute("SELECT count(*) FROM leases").fetchone()
        counts = dict(
            conn.execute("SELECT state, count(*) FROM tasks GROUP BY state ORDER BY 2 DESC").fetchall()
        )
        progress(
            f"plans: {tasks} tasks, {leases} leases in {time.monotonic() - began:.1f} s; EXPLAIN ANALYZE"
        )
    queries = scheduler_queries()
    result: dict[str, Any] = {"tasks": tasks, "leases": leases, "task_states": counts, "plans": {}}
    with psycopg.connect(stack.dsn, autocommit=False) as conn:
        for name, query in queries.items():
            sql = query
            if name == "usage_active":
                if busiest is None:
                    continue
                sql = query.replace("__WORKLOAD__", busiest.replace("'", "''"))
                row = conn.execute("SELECT count(*) FROM tasks WHERE workload = %s", (busiest,)).fetchone()
                assert row is not None  # count(*) always returns a row
                (result["usage_busiest_rows"],) = row
                conn.rollback()
            result["plans"][name] = explain(conn, sql, repeats=7)
    return result


# -- the run ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    random.seed(args.seed)
    results: dict[str, Any] = {
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_start": os.getloadavg(),
        },
        "targets": TARGETS,
    }
    ttl_max = 3600
    with bench_stack(sweep_seconds=args.sweep, keep=args.keep, ttl_max=ttl_max) as stack:
        server = stack.serve(workers=args.workers, threads=args.threads)
        progress(f"broker up at {server.url} ({args.workers} workers x {args.threads} threads + scheduler)")
        tokens = [stack.issuer.mint(spiffe(f"bench-c{i}")) for i in range(args.clients)]
        pool = ClientPool(server.url, stack.vault_addr, tokens)
        seq = Flows(server.url, stack.vault_addr, stack.issuer.mint(spiffe("bench-seq")))
        lag = Flows(server.url, stack.vault_addr, stack.issuer.mint(spiffe("bench-lag")))
        conn = stack.connect()
        meter = CpuMeter(lambda: process_groups(stack, server.pid, pool.pids))
        try:
            progress("warm-up: 10 ops of each flow, 1 s of 8-client load of each")
            for flow in FLOWS:
                sequential_block(seq, flow, 10)
            for flow in ("peer", "broker"):
                pool.closed_loop(flow, 1.0)

            # Unfinished tasks whose deadlines fall during the rounds: lag under load.
            per_round = args.ops * 0.15 + 2 * (args.duration + 0.5)
            horizon = max(6.0, args.rounds * per_round)
            progress(
                f"lag: starting {args.lag_tasks} unfinished tasks expiring over the next {horizon:.0f} s"
            )
            lag_ids = []
            for _ in range(args.lag_tasks):
                lag_ids.append(lag.start(ttl=random.randint(4, int(horizon)))["task_id"])

            rounds: list[dict[str, Any]] = []
            rss: list[dict[str, Any]] = []
            for index in range(args.rounds):
                order = FLOWS[index % 3 :] + FLOWS[: index % 3]
                one: dict[str, Any] = {"round": index + 1, "order": order, "seq": {}, "load": {}}
                for flow in order:
                    one["seq"][flow] = sequential_block(seq, flow, args.ops)
                for flow in ("peer", "broker") if index % 2 == 0 else ("broker", "peer"):
                    meter.start()
                    load = pool.closed_loop(flow, args.duration)
                    # Ops in flight at the bell finish before the meter stops: they count.
                    load["cpu_ms_per_op"] = meter.stop(load["ops"] + load["late"])
                    one["load"][flow] = load
                    if flow == "broker":
                        rss.append(rss_sample(server.pid))
                for flow, load in one["load"].items():
                    if load["errors"]:
                        progress(f"  {flow}: {load['errors']} errors, first: {load['first_error']}")
                rounds.append(one)
                p50 = {flow: median(one["seq"][flow]) * 1000 for flow in FLOWS}
                own = own_cpu(one["load"]["broker"]["cpu_ms_per_op"])
                progress(
                    f"round {index + 1}/{args.rounds}: p50 peer {p50['peer']:.1f} floor {p50['floor']:.1f} "
                    f"broker {p50['broker']:.1f} ms; 8 clients peer "
                    f"{one['load']['peer']['ops_per_s']:.1f} "
                    f"broker {one['load']['broker']['ops_per_s']:.1f} ops/s, own CPU {own:.1f} ms/op"
                )
            results["rounds"] = summarize_rounds(rounds)
            results["rss_samples"] = rss

            # Lag under load: which deadlines fell inside an 8-client window?
            wait_revoked(conn, lag_ids, timeout=60)
            windows = [load["wall_window"] for one in rounds for load in one["load"].values()]
            rows = lag_rows(conn, lag_ids)
            loaded = [r for r in rows if any(a <= r["expires_at"] <= b for a, b in windows)]
            results["lag_during_rounds"] = {
                "all": lag_summary(rows),
                "under_8_client_load": lag_summary(loaded),
            }

            # Lag on an idle broker: deadlines spread over ~3 s of sweep phase.
            progress(f"lag: {args.idle_lag_tasks} unfinished tasks (ttl 2 s) on an idle broker")
            idle_ids = []
            for _ in range(args.idle_lag_tasks):
                idle_ids.append(lag.start(ttl=2)["task_id"])
                time.sleep(random.uniform(0.0, 0.2))
            time.sleep(2.5)
            wait_revoked(conn, idle_ids, timeout=30)
            results["lag_idle"] = lag_summary(lag_rows(conn, idle_ids))
            progress(
                f"lag: idle p50 {results['lag_idle']['p50_s']:.2f} s "
                f"p99 {results['lag_idle']['p99_s']:.2f} s; "
                f"under load p50 {results['lag_during_rounds']['under_8_client_load']['p50_s']:.2f} s"
            )

            results["storm"] = storm(stack, pool, conn, args.storm, ttl_max)
            results["rss_after_storm"] = rss_sample(server.pid)
            busiest = conn.execute(
                "SELECT workload FROM tasks GROUP BY workload ORDER BY count(*) DESC LIMIT 1"
            ).fetchone()[0]
        finally:
            pool.close()
            seq.close()
            lag.close()
            conn.close()
            progress("stopping the broker before the synthetic rows")
            stack.stop_processes()
        results["queries"] = query_plans(stack, args.rows, busiest)
    results["host"]["loadavg_end"] = os.getloadavg()
    results["summary"] = summarize(results)
    return results


def own_cpu(per_op: dict[str, float]) -> float:
    """The broker's own CPU per op: its workers, its scheduler, its database's backends."""
    return sum(per_op.get(name, 0.0) for name in OWN_GROUPS)


def summarize_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"per_round": [], "seq": {}, "load": {}}
    for one in rounds:
        p50 = {flow: median(one["seq"][flow]) for flow in FLOWS}
        cpu = {flow: load["cpu_ms_per_op"] for flow, load in one["load"].items()}
        out["per_round"].append(
            {
                "round": one["round"],
                "order": list(one["order"]),
                "p50_ms": {flow: v * 1000 for flow, v in p50.items()},
                "overhead_ms": (p50["broker"] - p50["peer"]) * 1000,
                "cpu_ms_per_op": cpu,
                "own_cpu_ms": {flow: own_cpu(per_op) for flow, per_op in cpu.items()},
                "total_cpu_ms": {flow: sum(per_op.values()) for flow, per_op in cpu.items()},
                "broker_peer": p50["broker"] / p50["peer"],
                "broker_floor": p50["broker"] / p50["floor"],
                "ops_per_s": {flow: load["ops_per_s"] for flow, load in one["load"].items()},
                "throughput_ratio": one["load"]["broker"]["ops_per_s"] / one["load"]["peer"]["ops_per_s"],
                "load_errors": {flow: load["errors"] for flow, load in one["load"].items()},
            }
        )
    for flow in FLOWS:
        samples = [t * 1000 for one in rounds for t in one["seq"][flow]]
        out["seq"][flow] = {"n": len(samples), "p50_ms": median(samples), "p95_ms": pct(samples, 95)}
    for flow in ("peer", "broker"):
        rates = [one["load"][flow]["ops_per_s"] for one in rounds]
        samples = [t * 1000 for one in rounds for t in one["load"][flow]["latencies"]]
        out["load"][flow] = {
            "ops_per_s_median": median(rates),
            "ops_per_s_rounds": rates,
            "p50_ms": median(samples),
            "p95_ms": pct(samples, 95),
            "errors": sum(one["load"][flow]["errors"] for one in rounds),
        }
    return out


def _ratio_stats(values: list[float]) -> dict[str, float]:
    return {"median": median(values), "min": min(values), "max": max(values)}


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    per_round = results["rounds"]["per_round"]
    workers = [
        v["rss_mb"]
        for sample in [*results["rss_samples"], results["rss_after_storm"]]
        for v in sample["workers"].values()
    ]
    hwm = [v["hwm_mb"] for v in results["rss_after_storm"]["workers"].values()]
    plans = results["queries"]["plans"]
    own_parts = {
        name: median([r["cpu_ms_per_op"]["broker"].get(name, 0.0) for r in per_round]) for name in OWN_GROUPS
    }
    summary = {
        "overhead_ms": _ratio_stats([r["overhead_ms"] for r in per_round]),
        "peer_p50_ms": median([r["p50_ms"]["peer"] for r in per_round]),
        "own_cpu_ms": _ratio_stats([r["own_cpu_ms"]["broker"] for r in per_round]),
        "own_cpu_ms_parts": own_parts,
        "own_cpu_ms_in_peer_slots": median([r["own_cpu_ms"]["peer"] for r in per_round]),
        "total_cpu_ms": {
            flow: median([r["total_cpu_ms"][flow] for r in per_round]) for flow in ("peer", "broker")
        },
        "broker_peer_p50_ratio": _ratio_stats([r["broker_peer"] for r in per_round]),
        "broker_floor_p50_ratio": _ratio_stats([r["broker_floor"] for r in per_round]),
        "throughput_ratio": _ratio_stats([r["throughput_ratio"] for r in per_round]),
        "storm_seconds": results["storm"]["cleared_s"],
        "worker_rss_mb_max": max(workers) if workers else float("nan"),
        "worker_hwm_mb_max": max(hwm) if hwm else float("nan"),
        "due_query_uses_index": bool(plans["due"]["indexes"]) and "tasks" not in plans["due"]["seq_scans"],
        "retry_query_uses_index": bool(plans["retry"]["indexes"])
        and "leases" not in plans["retry"]["seq_scans"],
    }
    storm_ok = results["storm"]["all_revoked"] and summary["storm_seconds"] <= TARGETS["storm_seconds"]
    summary["met"] = {
        "overhead_ms": summary["overhead_ms"]["median"] <= TARGETS["overhead_ms"],
        "own_cpu_ms": summary["own_cpu_ms"]["median"] <= TARGETS["own_cpu_ms"],
        "broker_peer_p50_ratio": summary["broker_peer_p50_ratio"]["median"]
        <= TARGETS["broker_peer_p50_ratio"],
        "throughput_ratio": summary["throughput_ratio"]["median"] >= TARGETS["throughput_ratio"],
        # The target is for a storm of 1,000; a smaller one (--quick) is shown, not judged.
        "storm_seconds": bool(storm_ok) if results["storm"]["tasks"] >= 1000 else None,
        "worker_rss_mb": summary["worker_rss_mb_max"] <= TARGETS["worker_rss_mb"],
    }
    return summary


# -- output ----------------------------------------------------------------------------------


def _f(value: float, digits: int = 1) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
    )


def table(results: dict[str, Any]) -> str:
    s = results["summary"]
    met = s["met"]
    rounds = results["rounds"]
    seq, load = rounds["seq"], rounds["load"]
    status = {True: "met", False: "MISSED"}
    rows: list[tuple[str, str, str, str]] = []

    def add(metric: str, value: str, target: str = "", ok: bool | None = None) -> None:
        rows.append((metric, value, target, "" if ok is None else status[ok]))

    for flow, label in (("peer", "peer (JWT login+read+revoke)"), ("floor", "floor (read+revoke)"),
                        ("broker", "broker (start+finish)")):  # fmt: skip
        add(f"latency 1 client {label}", f"p50 {_f(seq[flow]['p50_ms'])} / p95 {_f(seq[flow]['p95_ms'])} ms")
    r = s["overhead_ms"]
    add("overhead: broker p50 - peer p50", f"{_f(r['median'])} ms (rounds {_f(r['min'])}-{_f(r['max'])}; "
        f"peer p50 {_f(s['peer_p50_ms'])} ms)", f"<= {TARGETS['overhead_ms']:.0f} ms",
        met["overhead_ms"])  # fmt: skip
    r, parts = s["own_cpu_ms"], s["own_cpu_ms_parts"]
    add(f"own CPU per op, {results['options']['clients']} clients",
        f"{_f(r['median'], 2)} ms (rounds {_f(r['min'], 2)}-{_f(r['max'], 2)}; workers "
        f"{_f(parts['broker workers'], 2)}, scheduler {_f(parts['broker scheduler'], 2)}, its Postgres "
        f"{_f(parts['postgres: broker db'], 2)}; in peer slots {_f(s['own_cpu_ms_in_peer_slots'], 2)})",
        f"<= {TARGETS['own_cpu_ms']:.0f} ms", met["own_cpu_ms"])  # fmt: skip
    total = s["total_cpu_ms"]
    add("CPU per op, every process", f"broker {_f(total['broker'])} / peer {_f(total['peer'])} ms")
    r = s["broker_peer_p50_ratio"]
    add("broker/peer p50", f"{_f(r['median'], 2)} (rounds {_f(r['min'], 2)}-{_f(r['max'], 2)})",
        f"<= {TARGETS['broker_peer_p50_ratio']}", met["broker_peer_p50_ratio"])  # fmt: skip
    r = s["broker_floor_p50_ratio"]
    add("broker/floor p50", f"{_f(r['median'], 2)} (rounds {_f(r['min'], 2)}-{_f(r['max'], 2)})")
    clients = results["options"]["clients"]
    for flow in ("peer", "broker"):
        add(
            f"throughput {clients} clients {flow}",
            f"{_f(load[flow]['ops_per_s_median'])} ops/s (p50 {_f(load[flow]['p50_ms'])} / "
            f"p95 {_f(load[flow]['p95_ms'])} ms, {load[flow]['errors']} err)",
        )
    r = s["throughput_ratio"]
    add("broker/peer throughput", f"{_f(r['median'], 2)} (rounds {_f(r['min'], 2)}-{_f(r['max'], 2)})",
        f">= {TARGETS['throughput_ratio']}", met["throughput_ratio"])  # fmt: skip
    loaded = results["lag_during_rounds"]["under_8_client_load"]
    for label, lag in (("idle", results["lag_idle"]), ("under 8-client load", loaded)):
        add(
            f"revocation lag {label}",
            f"p50 {_f(lag['p50_s'], 2)} / p99 {_f(lag['p99_s'], 2)} s "
            f"(n={lag['revoked']}, missed {lag['missed']}, >2 s: {lag['over_2s']})",
            "<= 2 s (SPEC 6.4)",
            lag["missed"] == 0 and lag["over_2s"] == 0 if lag["tasks"] else None,
        )
    st = results["storm"]
    add(
        f"expiry storm {st['tasks']} tasks",
        f"cleared {_f(st['cleared_s'], 2)} s after deadline ({st['revoked']}/{st['tasks']} revoked, "
        f"lag p50 {_f(st['lag']['p50_s'], 2)} s)",
        f"<= {TARGETS['storm_seconds']:.0f} s for 1000",
        met["storm_seconds"],
    )
    q = results["queries"]
    labels = (
        ("due", "due-task query"), ("retry", "retry query"), ("reconcile", "reconcile query"),
        ("retire", "token-retire query"), ("usage_active", "usage count, busiest workload"),
    )  # fmt: skip
    for name, label in labels:
        plan = q["plans"].get(name)
        if plan is None:
            continue
        how = ", ".join(plan["indexes"]) or "no index"
        if plan["seq_scans"]:
            how += f"; Seq Scan on {', '.join(plan['seq_scans'])}"
        extra = f" ({q.get('usage_busiest_rows')} rows)" if name == "usage_active" else ""
        ok = None
        if name in ("due", "retry"):
            ok = s[f"{name}_query_uses_index"]
        add(f"{label} @ {q['tasks']} tasks{extra}", f"{_f(plan['execution_ms_median'], 3)} ms, {how}",
            "uses an index" if ok is not None else "", ok)  # fmt: skip
    last = results["rss_after_storm"]
    per_worker = ", ".join(_f(v["rss_mb"], 0) for v in last["workers"].values())
    add(
        "RSS per gunicorn worker",
        f"max {_f(s['worker_rss_mb_max'], 0)} MB over samples (now {per_worker}; peak HWM "
        f"{_f(s['worker_hwm_mb_max'], 0)})",
        f"<= {TARGETS['worker_rss_mb']:.0f} MB",
        met["worker_rss_mb"],
    )
    sched = ", ".join(_f(v["rss_mb"], 0) for v in last["scheduler"].values())
    add("RSS scheduler process", f"{sched} MB")

    opts = results["options"]
    head = (
        f"Credential Broker benchmark  {results['started_at']}  rounds={opts['rounds']} "
        f"ops/flow/round={opts['ops']} slot={opts['duration']:.0f}s "
        f"workers={opts['workers']}x{opts['threads']} "
        f"cpus={results['host']['cpus']} load={results['host']['loadavg_start'][0]:.2f}"
        f"->{results['host']['loadavg_end'][0]:.2f}"
    )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    widths = [max(w, len(h)) for w, h in zip(widths, ("metric", "value", "target", "status"), strict=True)]
    lines = [head, ""]
    header = ("metric", "value", "target", "status")
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    judged = {name: ok for name, ok in met.items() if ok is not None}
    missed = [name for name, ok in judged.items() if not ok]
    lines.append("")
    lines.append(
        f"targets: {len(judged) - len(missed)}/{len(judged)} met"
        + (f"; missed: {', '.join(missed)}" if missed else "")
        + (f"; not judged: {', '.join(sorted(set(met) - set(judged)))}" if len(judged) < len(met) else "")
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    results = run(args)
    results["elapsed_s"] = time.monotonic() - started
    out = args.json or ROOT / "bench" / "results" / (
        dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + ("-quick" if args.quick else "") + ".json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    text = table(results)
    results["table"] = text
    out.write_text(json.dumps(results, indent=2, default=str))
    print(text)
    print(f"\nJSON: {out}  ({results['elapsed_s']:.0f} s)")
    missed = any(ok is False for ok in results["summary"]["met"].values())
    return 1 if missed and args.fail_on_miss else 0


if __name__ == "__main__":
    sys.exit(main())
