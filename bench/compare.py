"""Two versions of the broker side by side on one stack: what a change took off.

    .venv/bin/python bench/compare.py --base main [--rounds 6] [--ops 40] [--duration 8]
        [--storm 1000] [--storms 2]

On a shared 2-core box two runs of bench/run, one before and one after, differ by more
than most changes do. Here both versions run at once on one throwaway stack, and each
measurement alternates between them:
- two `broker serve` (2 workers x 4 threads + scheduler, as bench/run), one from the
  tree of git revision `--base` (`git archive`d into the temp dir), one from this working
  tree, each with its own database (a copy of the migrated one), so its Postgres backends
  and its scheduler's work are its own;
- each round: a sequential block of `--ops` ops of peer, base and new (the order rotates),
  then an 8-client closed-loop slot of each (rotating too), with the CPU (/proc) of each
  side's workers, scheduler and database backends around its slot;
- then `--storms` expiry storms per side, alternating: `--storm` tasks given one deadline,
  time from it until the last lease is revoked.

Reported: per side the medians over rounds of the overhead (p50 - peer p50 of the same
round), its own CPU per op, throughput and storm time, and the new/base ratio of each
(computed per round; median and range). Both trees must share the database schema.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from clients import ClientPool
from harness import (
    OWN_GROUPS,
    ROOT,
    BenchStack,
    CpuMeter,
    Flows,
    bench_stack,
    median,
    process_groups,
    progress,
    spiffe,
)

SIDES = ("base", "new")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/compare.py", description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="main", help="git revision of the base side (default main)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--ops", type=int, default=40, help="sequential ops per flow per round")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per 8-client slot")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--storm", type=int, default=1000, help="tasks per expiry storm (0: none)")
    parser.add_argument("--storms", type=int, default=2, help="expiry storms per side")
    parser.add_argument("--json", type=Path, help="default bench/results/compare-<ts>.json")
    parser.add_argument("--keep", action="store_true", help="keep the stack's temp dir (logs)")
    return parser.parse_args()


def base_tree(revision: str, into: Path) -> Path:
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "broker", "migrations", "alembic.ini"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def side_config(stack: BenchStack, database: str) -> Path:
    """The stack's broker.yaml with its own database, a copy of the migrated one."""
    import psycopg

    admin = stack.stack.postgres.url("postgres").replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:  # not connected to the template
        conn.execute(f'CREATE DATABASE "{database}" TEMPLATE broker')
    config = yaml.safe_load(stack.config_path.read_text())
    config["database_url"] = stack.stack.postgres.url(database)
    path = stack.workdir / f"broker-{database}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def storm(stack: BenchStack, pool: ClientPool, database: str, count: int) -> float:
    import psycopg

    ids = pool.start_many(count, 3600)
    dsn = stack.stack.postgres.url(database).replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "UPDATE tasks SET expires_at = date_trunc('second', now()) + interval '3 seconds'"
            " WHERE id = ANY(%s::uuid[]) RETURNING extract(epoch FROM expires_at)",
            (ids,),
        ).fetchone()
        assert row is not None, "no task updated"
        (deadline,) = row
        until = time.monotonic() + 120
        while time.monotonic() < until:
            row = conn.execute(
                "SELECT count(*) FROM leases WHERE task_id = ANY(%s::uuid[]) AND state <> 'revoked'", (ids,)
            ).fetchone()
            assert row is not None  # count(*) always returns a row
            (left,) = row
            if left == 0:
                break
            time.sleep(0.1)
        (last,) = conn.execute(
            "SELECT extract(epoch FROM max(revoked_at)) FROM leases WHERE task_id = ANY(%s::uuid[])"
            " HAVING count(*) FILTER (WHERE state <> 'revoked') = 0",
            (ids,),
        ).fetchone() or (None,)
    return float("nan") if last is None else float(last) - float(deadline)


def stats(values: list[float]) -> dict[str, float]:
    return {"median": median(values), "min": min(values), "max": max(values)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rounds": [],
        "storms": {side: [] for side in SIDES},
    }
    with bench_stack(keep=args.keep) as stack:
        trees = {"base": base_tree(args.base, stack.workdir / "base-tree"), "new": ROOT}
        databases = {"base": "broker_base", "new": "broker_new"}
        servers, pools, seqs, meters = {}, {}, {}, {}
        for side in SIDES:
            config = side_config(stack, databases[side])
            servers[side] = stack.serve(config=config, code=trees[side])
            tokens = [stack.issuer.mint(spiffe(f"cmp-{side}-c{i}")) for i in range(args.clients)]
            pools[side] = ClientPool(servers[side].url, stack.vault_addr, tokens)
            seqs[side] = Flows(servers[side].url, stack.vault_addr, stack.issuer.mint(spiffe(f"cmp-{side}")))
            master, pids, db = servers[side].pid, pools[side].pids, databases[side]
            meters[side] = CpuMeter(functools.partial(process_groups, stack, master, pids, broker_db=db))
            progress(f"{side}: {trees[side]} at {servers[side].url}, database {databases[side]}")
        peer = seqs["new"]
        try:
            progress("warm-up")
            for side in SIDES:
                for _ in range(10):
                    seqs[side].broker_op()
                pools[side].closed_loop("broker", 1.0)
            pools["new"].closed_loop("peer", 1.0)
            for index in range(args.rounds):
                flows = ("peer", *SIDES)
                order = flows[index % 3 :] + flows[: index % 3]
                one: dict[str, Any] = {"round": index + 1, "order": order, "p50_ms": {}, "load": {}}
                for flow in order:
                    samples = []
                    for _ in range(args.ops):
                        began = time.perf_counter()
                        peer.peer() if flow == "peer" else seqs[flow].broker_op()
                        samples.append(time.perf_counter() - began)
                    one["p50_ms"][flow] = median(samples) * 1000
                for flow in order:
                    side = "new" if flow == "peer" else flow
                    meters[side].start()
                    load = pools[side].closed_loop("peer" if flow == "peer" else "broker", args.duration)
                    cpu = meters[side].stop(load["ops"] + load["late"])
                    one["load"][flow] = {
                        "ops_per_s": load["ops_per_s"],
                        "errors": load["errors"],
                        "cpu_ms_per_op": cpu,
                        "own_cpu_ms": sum(cpu.get(name, 0.0) for name in OWN_GROUPS),
                        "total_cpu_ms": sum(cpu.values()),
                    }
                for side in SIDES:
                    one["load"][side]["overhead_ms"] = one["p50_ms"][side] - one["p50_ms"]["peer"]
                result["rounds"].append(one)
                progress(
                    f"round {index + 1}: p50 peer {one['p50_ms']['peer']:.1f} "
                    + " ".join(
                        f"| {side} p50 {one['p50_ms'][side]:.1f} ms, "
                        f"{one['load'][side]['ops_per_s']:.0f} ops/s, "
                        f"own CPU {one['load'][side]['own_cpu_ms']:.2f} ms/op"
                        for side in SIDES
                    )
                    + f" | peer {one['load']['peer']['ops_per_s']:.0f} ops/s"
                )
            for number in range(args.storms if args.storm else 0):
                for side in SIDES if number % 2 == 0 else SIDES[::-1]:
                    cleared = storm(stack, pools[side], databases[side], args.storm)
                    result["storms"][side].append(cleared)
                    progress(f"storm {number + 1} {side}: {args.storm} tasks cleared in {cleared:.2f} s")
        finally:
            for side in SIDES:
                pools[side].close()
                seqs[side].close()
    return result


def summary(result: dict[str, Any]) -> dict[str, Any]:
    rounds = result["rounds"]
    metrics = {
        "overhead_ms": lambda one, side: one["load"][side]["overhead_ms"],
        "p50_ms": lambda one, side: one["p50_ms"][side],
        "own_cpu_ms": lambda one, side: one["load"][side]["own_cpu_ms"],
        "total_cpu_ms": lambda one, side: one["load"][side]["total_cpu_ms"],
        "ops_per_s": lambda one, side: one["load"][side]["ops_per_s"],
        "throughput_ratio": lambda one, side: (
            one["load"][side]["ops_per_s"] / one["load"]["peer"]["ops_per_s"]
        ),
        "p50_ratio": lambda one, side: one["p50_ms"][side] / one["p50_ms"]["peer"],
    }
    out: dict[str, Any] = {}
    for name, get in metrics.items():
        values = {side: [get(one, side) for one in rounds] for side in SIDES}
        out[name] = {
            **{side: stats(values[side]) for side in SIDES},
            "new/base": stats([n / b for n, b in zip(values["new"], values["base"], strict=True) if b]),
        }
    for group in OWN_GROUPS:
        out[f"cpu: {group}"] = {
            side: stats([one["load"][side]["cpu_ms_per_op"].get(group, 0.0) for one in rounds])
            for side in SIDES
        }
    out["peer_p50_ms"] = stats([one["p50_ms"]["peer"] for one in rounds])
    storms = result["storms"]
    if storms["base"]:
        out["storm_s"] = {side: stats(storms[side]) for side in SIDES}
    return out


def report(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [
        f"compare {result['options']['base']} (base) with this tree (new), {len(result['rounds'])} rounds, "
        f"peer p50 {s['peer_p50_ms']['median']:.1f} ms (rounds {s['peer_p50_ms']['min']:.1f}-"
        f"{s['peer_p50_ms']['max']:.1f})",
        "",
        f"{'metric (median over rounds)':34} {'base':>22} {'new':>22} {'new/base per round':>22}",
    ]

    def cell(value: dict[str, float], digits: int) -> str:
        return f"{value['median']:.{digits}f} ({value['min']:.{digits}f}-{value['max']:.{digits}f})"

    for name, label, digits in (
        ("overhead_ms", "overhead, ms (p50 - peer p50)", 1),
        ("p50_ms", "p50 start+finish, ms", 1),
        ("own_cpu_ms", "own CPU per op, ms", 2),
        ("cpu: broker workers", "  workers", 2),
        ("cpu: broker scheduler", "  scheduler", 2),
        ("cpu: postgres: broker db", "  its Postgres", 2),
        ("total_cpu_ms", "CPU per op, every process, ms", 1),
        ("ops_per_s", "8-client ops/s", 1),
        ("throughput_ratio", "throughput / peer", 2),
        ("p50_ratio", "p50 / peer p50", 2),
    ):
        row = s[name]
        ratio = cell(row["new/base"], 2) if "new/base" in row else ""
        lines.append(f"{label:34} {cell(row['base'], digits):>22} {cell(row['new'], digits):>22} {ratio:>22}")
    if "storm_s" in s:
        row = s["storm_s"]
        lines.append(
            f"{'storm of ' + str(result['options']['storm']) + ', s':34} {cell(row['base'], 2):>22} "
            f"{cell(row['new'], 2):>22}"
        )
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    result = run(args)
    result["summary"] = summary(result)
    text = report(result)
    out = args.json or ROOT / "bench" / "results" / (
        "compare-" + dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + ".json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    result["table"] = text
    out.write_text(json.dumps(result, indent=2, default=str))
    print(text)
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
