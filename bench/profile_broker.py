"""Where a broker start+finish spends its time, under the same 8-client load as bench/run.

    .venv/bin/pip install py-spy          # once
    .venv/bin/python bench/profile_broker.py [--duration 20] [--rate 97]

Same stack and server shape as bench/run (2 gunicorn workers x 4 threads + scheduler).
Four views, written to bench/results/profile-<ts>.json and summarised on stdout:

1. CPU per op by process (utime+stime from /proc, 8-client closed loop): gunicorn workers,
   scheduler, OpenBao, Postgres backends of the broker DB, of the target DB (Vault's
   plugin), other Postgres, the client processes. Broker flow vs peer flow, so the extra
   work the broker puts on the 2 cores is visible; and, at 8 clients, `frame`: two
   GET /healthz per op, the floor that HTTP, gunicorn, Flask and the hooks put under any
   two requests.
2. SQL per op: `log_statement=all` for a window of sequential broker ops (idle baseline of
   the scheduler subtracted), transactions and statements by kind.
3. py-spy wall-clock profile (`--idle`) of both workers: each sample of a request thread is
   attributed to Vault (by gateway call), JWT verify, policy, audit chain, DB (by service
   step), JSON/validation, framework; shown as ms per op.
4. py-spy CPU profile (no `--idle`): top functions by self time.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clients import ClientPool
from harness import (
    CONTEXT,
    OWNER,
    PURPOSE,
    ROOT,
    TASK,
    BenchStack,
    Flows,
    bench_stack,
    cpu_seconds,
    gunicorn_workers,
    process_groups,
    progress,
    spiffe,
)

# -- CPU by process ------------------------------------------------------------------------


def cpu_window(
    stack: BenchStack, pool: ClientPool, master: int, flow: str, duration: float, clients: int
) -> dict[str, Any]:
    groups = process_groups(stack, master, pool.pids)
    before = {pid: cpu_seconds(pid) for pids in groups.values() for pid in pids}
    load = pool.closed_loop(flow, duration, clients=clients)
    # Processes born during the window (Vault opens backends) count from zero; ones that
    # died during it are lost (their last reading is gone), so this slightly undercounts.
    after_groups = process_groups(stack, master, pool.pids)
    ops = max(1, load["ops"])
    per_op = {}
    for name, pids in after_groups.items():
        used = sum(max(0.0, cpu_seconds(pid) - before.get(pid, 0.0)) for pid in pids)
        per_op[name] = used * 1000 / ops
    return {"flow": flow, "ops": load["ops"], "ops_per_s": load["ops_per_s"], "cpu_ms_per_op": per_op}


# -- SQL per op ------------------------------------------------------------------------------

_STATEMENT = re.compile(r" broker credential-broker (?:LOG|LOG:)?\s*(?:statement|execute [^:]*): (.*)$")


def _kind(sql: str) -> str:
    s = " ".join(sql.split())
    low = s.lower()
    if low.strip() == ";":
        return "; (pool_pre_ping on checkout)"
    for prefix in ("begin", "commit", "rollback", "select 1", "select pg_advisory_xact_lock", "select now()"):
        if low.startswith(prefix):
            return prefix.upper()
    if low.startswith("select"):
        table = re.search(r"\bfrom (\w+)", low)
        return f"SELECT ... FROM {table.group(1) if table else '?'}"
    table = re.match(r"(insert into|update|delete from) (\w+)", low)
    return f"{table.group(1).upper()} {table.group(2)}" if table else low[:40]


_ENTRY = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def _log_lines(path: Path, offset: int) -> list[str]:
    """Log entries from `offset` on, a multi-line statement joined into one line."""
    with path.open("rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace")
    entries: list[str] = []
    for line in text.splitlines():
        if _ENTRY.match(line) or not entries:
            entries.append(line)
        else:
            entries[-1] += " " + line.strip()
    return entries


def sql_per_op(stack: BenchStack, flows: Flows, ops: int) -> dict[str, Any]:
    log = stack.stack.postgres.log_path
    with stack.connect() as conn:
        conn.execute("ALTER SYSTEM SET log_statement = 'all'")
        conn.execute("ALTER SYSTEM SET log_line_prefix = '%m [%p] %d %a '")
        conn.execute("SELECT pg_reload_conf()")
    time.sleep(1.0)
    try:
        # Baseline: the scheduler alone, for as long as the measured window will take.
        began = time.monotonic()
        for _ in range(3):
            flows.broker_op()
        estimate = (time.monotonic() - began) / 3 * ops
        offset = log.stat().st_size
        time.sleep(estimate)
        idle = [m.group(1) for line in _log_lines(log, offset) if (m := _STATEMENT.search(line))]
        idle_seconds = estimate
        offset = log.stat().st_size
        began = time.monotonic()
        for _ in range(ops):
            flows.broker_op()
        busy_seconds = time.monotonic() - began
        busy = [m.group(1) for line in _log_lines(log, offset) if (m := _STATEMENT.search(line))]
    finally:
        with stack.connect() as conn:
            conn.execute("ALTER SYSTEM RESET log_statement")
            conn.execute("ALTER SYSTEM RESET log_line_prefix")
            conn.execute("SELECT pg_reload_conf()")
    scale = busy_seconds / idle_seconds if idle_seconds else 0.0
    busy_kinds = collections.Counter(_kind(s) for s in busy)
    idle_kinds = collections.Counter(_kind(s) for s in idle)
    per_op = {
        kind: round((busy_kinds[kind] - idle_kinds.get(kind, 0) * scale) / ops, 2)
        for kind in busy_kinds
        if (busy_kinds[kind] - idle_kinds.get(kind, 0) * scale) / ops >= 0.05
    }
    return {
        "ops": ops,
        "statements_per_op": round((len(busy) - len(idle) * scale) / ops, 1),
        "scheduler_statements_per_s": round(len(idle) / idle_seconds, 1) if idle_seconds else None,
        "by_kind_per_op": dict(sorted(per_op.items(), key=lambda kv: -kv[1])),
        "commits_per_op": per_op.get("COMMIT", 0.0),
    }


# -- instrumented, in-process ---------------------------------------------------------------


class _Timers:
    """Exclusive (innermost label) and inclusive wall/CPU time per label, one thread."""

    def __init__(self) -> None:
        self.wall: collections.Counter[str] = collections.Counter()
        self.cpu: collections.Counter[str] = collections.Counter()
        self.incl: collections.Counter[str] = collections.Counter()
        self.count: collections.Counter[str] = collections.Counter()
        self.stack: list[list[Any]] = []  # [label, wall mark, cpu mark, wall start]

    def enter(self, label: str) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        if self.stack:
            top = self.stack[-1]
            self.wall[top[0]] += wall - top[1]
            self.cpu[top[0]] += cpu - top[2]
        self.stack.append([label, wall, cpu, wall])
        self.count[label] += 1

    def leave(self) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        label, wall_mark, cpu_mark, started = self.stack.pop()
        self.wall[label] += wall - wall_mark
        self.cpu[label] += cpu - cpu_mark
        self.incl[label] += wall - started
        if self.stack:
            self.stack[-1][1], self.stack[-1][2] = wall, cpu


def _instrument(timers: _Timers) -> None:
    """Monkeypatch (in this process only) the broker's and drivers' entry points with timers."""
    import psycopg

    from broker.audit.chain import AuditRecorder
    from broker.identity.verifier import Verifier
    from broker.policy.engine import Policy
    from broker.vault.http import VaultHTTP

    def wrap(owner: Any, name: str, label: Any) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            # One thread's timers: the token pool's refill thread must not interleave.
            if threading.current_thread() is not threading.main_thread():
                return original(*args, **kwargs)
            timers.enter(label(args, kwargs) if callable(label) else label)
            try:
                return original(*args, **kwargs)
            finally:
                timers.leave()

        setattr(owner, name, timed)

    def vault_label(args: Any, kwargs: Any) -> str:
        operation = str(kwargs.get("operation", "?"))
        return "Vault: " + re.sub(r"write policy .*", "write policy", operation)

    wrap(VaultHTTP, "call", vault_label)
    wrap(psycopg.Cursor, "execute", lambda args, kwargs: "SQL: " + _kind(str(args[1])))
    wrap(psycopg.Connection, "commit", "SQL: COMMIT")
    wrap(psycopg.Connection, "rollback", "SQL: ROLLBACK")
    wrap(Verifier, "verify", "JWT verify")
    wrap(Policy, "evaluate", "policy evaluate (CEL, globs)")
    wrap(AuditRecorder, "take_rows", "audit rows (MAC)")


def inprocess_breakdown(stack: BenchStack, ops: int) -> dict[str, Any]:
    """One thread, the Flask app in this process (no gunicorn, no HTTP hop to the broker):
    exclusive wall and CPU (thread_time) per op for each Vault call, SQL statement kind,
    JWT verify, policy, the audit seal's own Python, and everything else (Flask, ORM)."""
    from broker.app import create_app
    from broker.config import load_settings
    from broker.services import build_services

    timers = _Timers()
    _instrument(timers)  # before build_services: the audit hook binds its methods at install time
    services = build_services(load_settings(str(stack.config_path)))
    client = create_app(services=services).test_client()
    headers = {"Authorization": f"Bearer {stack.issuer.mint(spiffe('prof-inproc'))}"}
    body = {"task": TASK, "owner": OWNER, "purpose": PURPOSE, "context": CONTEXT}

    def op() -> None:
        timers.enter("request: Flask, ORM, JSON, rest")
        try:
            started = client.post("/task/start", json=body, headers=headers)
            assert started.status_code == 201, started.data
            task_id = started.get_json()["task_id"]
            finished = client.post("/task/finish", json={"task_id": task_id}, headers=headers)
            assert finished.status_code == 200, finished.data
        finally:
            timers.leave()

    try:
        for _ in range(10):
            op()
        for counter in (timers.wall, timers.cpu, timers.incl, timers.count):
            counter.clear()
        before = os.times()
        began = time.perf_counter()
        for _ in range(ops):
            op()
        wall = time.perf_counter() - began
        after = os.times()
    finally:
        services.close()
    labels = sorted(timers.wall, key=lambda label: -timers.wall[label])
    return {
        "ops": ops,
        "wall_ms_per_op": wall * 1000 / ops,
        "process_user_ms_per_op": (after.user - before.user) * 1000 / ops,
        "process_sys_ms_per_op": (after.system - before.system) * 1000 / ops,
        "by_label": {
            label: {
                "calls_per_op": round(timers.count[label] / ops, 2),
                "wall_ms_per_op": round(timers.wall[label] * 1000 / ops, 2),
                "cpu_ms_per_op": round(timers.cpu[label] * 1000 / ops, 2),
                "inclusive_wall_ms_per_op": round(timers.incl[label] * 1000 / ops, 2),
            }
            for label in labels
        },
    }


# -- py-spy ----------------------------------------------------------------------------------


def py_spy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


def record(
    spy: str, pids: list[int], out_dir: Path, duration: float, rate: int, idle: bool, tag: str
) -> tuple[list[subprocess.Popen[bytes]], list[Path]]:
    procs, outputs = [], []
    for pid in pids:
        output = out_dir / f"pyspy-{tag}-{pid}.txt"
        command = [spy, "record", "--pid", str(pid), "--rate", str(rate), "--duration", str(int(duration)),
                   "--format", "raw", "--output", str(output), "--nonblocking"]  # fmt: skip
        if idle:
            command.append("--idle")
        procs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        outputs.append(output)
    return procs, outputs


_FRAME = re.compile(r"^(.*) \((.*?)(?::(\d+))?\)$")


def parse_raw(paths: list[Path]) -> list[tuple[list[tuple[str, str]], int]]:
    stacks = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            body, _, count = line.rpartition(" ")
            if not body or not count.isdigit():
                continue
            frames = []
            for part in body.split(";"):
                match = _FRAME.match(part)
                frames.append((match.group(1), match.group(2)) if match else (part, ""))
            stacks.append((frames, int(count)))
    return stacks


_VAULT_PLUMBING = {"_as_broker", "_as_task", "_auth", "_leased", "call", "_send", "_reply", "_json_body"}


def _in(path: str, package: str) -> bool:
    """py-spy prints paths relative to sys.path entries: `broker/vault/http.py`, `flask/app.py`."""
    return ("/" + path).find("/" + package) >= 0


def _name(fn: str) -> str:
    return fn.rsplit(".", 1)[-1]


REQUEST_ROOTS = frozenset({"full_dispatch_request", "wsgi_app"})
SCHEDULER_ROOTS = frozenset({"loop"})  # Jobs._drain.<locals>.loop: one claim + revoke + commit


def attribute(frames: list[tuple[str, str]], roots: frozenset[str] = REQUEST_ROOTS) -> str | None:
    """Bucket for one sample of a working thread; None for a thread not doing that work."""
    if not any(_name(fn) in roots for fn, _ in frames):
        return None
    for fn, path in frames:  # outermost owner wins
        if _in(path, "broker/vault/"):
            calls = [
                _name(f)
                for f, p in frames
                if _in(p, "broker/vault/gateway.py") and _name(f) not in _VAULT_PLUMBING
            ]
            return f"Vault: {calls[-1] if calls else _name(fn)}"
        if _in(path, "broker/identity/"):
            return "JWT verify"
        if _in(path, "broker/policy/"):
            return "policy (CEL, globs)"
        if _in(path, "broker/audit/"):
            return "audit chain (seal: lock, head, hash, insert)"
    if any(_in(p, "sqlalchemy/") or _in(p, "psycopg") for _, p in frames):
        steps = [_name(fn) for fn, p in frames if _in(p, "broker/") and not _in(p, "broker/db.py")]
        step = steps[-1] if steps else "?"
        committing = any(_name(fn) == "commit" and _in(p, "sqlalchemy/") for fn, p in frames)
        return f"DB: {step}{' (commit)' if committing else ''}"
    if any(_in(p, "pydantic") for _, p in frames):
        return "request validation (pydantic)"
    if any(_in(p, "json/") for _, p in frames):
        return "JSON"
    inner = [_name(fn) for fn, p in frames if _in(p, "broker/")]
    if inner:
        return f"broker code: {inner[-1]}"
    return "framework (gunicorn/flask/werkzeug)"


def breakdown(
    stacks: list[tuple[list[tuple[str, str]], int]],
    rate: int,
    ops: int,
    roots: frozenset[str] = REQUEST_ROOTS,
) -> dict[str, Any]:
    buckets: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        bucket = attribute(frames, roots)
        if bucket is not None:
            buckets[bucket] += count
    total = sum(buckets.values())
    return {
        "request_thread_ms_per_op": total / rate * 1000 / max(1, ops),
        "buckets_ms_per_op": {k: round(v / rate * 1000 / max(1, ops), 2) for k, v in buckets.most_common()},
        "buckets_share": {k: round(v / total, 3) for k, v in buckets.most_common()} if total else {},
    }


def self_time(stacks: list[tuple[list[tuple[str, str]], int]], top: int = 20) -> list[tuple[str, float]]:
    leaves: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        if frames:
            fn, path = frames[-1]
            short = re.sub(r".*/(site-packages|lib/python3\.\d+)/", "", path)
            short = re.sub(r".*/work/main/", "", short)
            leaves[f"{fn} ({short})"] += count
    total = sum(leaves.values()) or 1
    return [(name, round(count / total, 3)) for name, count in leaves.most_common(top)]


def storm_profile(
    stack: BenchStack, pool: ClientPool, master: int, spy: str | None, out_dir: Path, args: Any
) -> dict[str, Any]:
    """CPU per expired task by process, and a py-spy wall profile of the scheduler, while
    `args.storm` tasks given one deadline are expired."""
    import signal

    progress(f"storm: starting {args.storm} tasks")
    task_ids = pool.start_many(args.storm, 3600)
    _, schedulers = gunicorn_workers(master)
    groups = process_groups(stack, master, pool.pids)
    before = {pid: cpu_seconds(pid) for pids in groups.values() for pid in pids}
    procs: list[subprocess.Popen[bytes]] = []
    outputs: list[Path] = []
    if spy is not None:
        procs, outputs = record(spy, schedulers, out_dir, 120, args.rate, True, "storm")
        time.sleep(1.0)
    with stack.connect() as conn:
        conn.execute(
            "UPDATE tasks SET expires_at = now() + interval '1 second' WHERE id = ANY(%s::uuid[])",
            (task_ids,),
        )
        began = time.monotonic()
        while time.monotonic() - began < 180:
            (left,) = conn.execute(
                "SELECT count(*) FROM leases WHERE task_id = ANY(%s::uuid[]) AND state <> 'revoked'",
                (task_ids,),
            ).fetchone()
            if left == 0:
                break
            time.sleep(0.1)
        took = time.monotonic() - began - 1.0
    for proc in procs:
        proc.send_signal(signal.SIGINT)  # py-spy writes what it has on Ctrl-C
        proc.wait(timeout=60)
    after_groups = process_groups(stack, master, pool.pids)
    per_task = {
        name: round(
            sum(max(0.0, cpu_seconds(pid) - before.get(pid, 0.0)) for pid in pids) * 1000 / len(task_ids), 2
        )
        for name, pids in after_groups.items()
    }
    result: dict[str, Any] = {
        "tasks": len(task_ids),
        "cleared_s_after_deadline": round(took, 2),
        "cpu_ms_per_expired_task": per_task,
        "total_cpu_ms_per_expired_task": round(sum(per_task.values()), 1),
    }
    if outputs:
        stacks = parse_raw(outputs)
        result["scheduler_wall"] = breakdown(stacks, args.rate, len(task_ids), SCHEDULER_ROOTS)
        result["raw"] = [str(p) for p in outputs]
    progress(f"storm: {len(task_ids)} tasks cleared {took:.1f} s after the deadline")
    return result


# -- main ------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per measured window")
    parser.add_argument("--rate", type=int, default=97, help="py-spy samples per second")
    parser.add_argument("--sql-ops", type=int, default=40)
    parser.add_argument("--inproc-ops", type=int, default=100)
    parser.add_argument("--storm", type=int, default=500, help="tasks in the profiled expiry storm (0: skip)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    spy = py_spy()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir = ROOT / "bench" / "results" / f"profile-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"started_at": stamp, "options": vars(args)}

    with bench_stack(keep=args.keep) as stack:
        server = stack.serve(workers=args.workers, threads=args.threads)
        tokens = [stack.issuer.mint(spiffe(f"prof-c{i}")) for i in range(8)]
        pool = ClientPool(server.url, stack.vault_addr, tokens)
        seq = Flows(server.url, stack.vault_addr, stack.issuer.mint(spiffe("prof-seq")))
        try:
            progress("warm-up")
            for flow in ("peer", "broker"):
                pool.closed_loop(flow, 2.0)
            cpu: dict[str, Any] = {}
            for clients in (1, 8):
                progress(f"CPU per op by process, {clients} client(s): peer, broker, peer, broker")
                # `frame` only at 8 clients: the framework's floor under the same load shape.
                flows = ("peer", "broker", "frame") if clients == 8 else ("peer", "broker")
                windows = [
                    cpu_window(stack, pool, server.pid, flow, args.duration / 2, clients)
                    for flow in flows * 2
                ]
                for flow in flows:
                    mine = [w for w in windows if w["flow"] == flow]
                    names = sorted({n for w in mine for n in w["cpu_ms_per_op"]})
                    one: dict[str, Any] = {
                        "ops_per_s": [w["ops_per_s"] for w in mine],
                        "cpu_ms_per_op": {
                            n: round(sum(w["cpu_ms_per_op"].get(n, 0) for w in mine) / len(mine), 2)
                            for n in names
                        },
                    }
                    one["total_cpu_ms_per_op"] = round(sum(one["cpu_ms_per_op"].values()), 1)
                    cpu[f"{flow} x{clients}"] = one
            result["cpu"] = cpu

            progress(f"SQL per op: log_statement=all for {args.sql_ops} sequential broker ops")
            result["sql"] = sql_per_op(stack, seq, args.sql_ops)
            progress(f"instrumented in-process run: {args.inproc_ops} sequential ops, one thread")
            result["inprocess"] = inprocess_breakdown(stack, args.inproc_ops)

            if spy is None:
                progress("py-spy not installed (.venv/bin/pip install py-spy): skipping the profiles")
            else:
                workers, _ = gunicorn_workers(server.pid)
                for idle, tag in ((True, "wall"), (False, "cpu")):
                    progress(f"py-spy {tag} profile of workers {workers} under 8-client broker load")
                    procs, outputs = record(spy, workers, out_dir, args.duration, args.rate, idle, tag)
                    time.sleep(1.0)  # py-spy attaches
                    load = pool.closed_loop("broker", args.duration - 1.5)
                    for proc in procs:
                        proc.wait(timeout=60)
                    stacks = parse_raw(outputs)
                    # the load ran for (duration - 1.5) s of the duration s sampled
                    ops = int(load["ops"] * args.duration / (args.duration - 1.5))
                    result[f"pyspy_{tag}"] = {
                        "ops": load["ops"],
                        "ops_per_s": load["ops_per_s"],
                        "breakdown": breakdown(stacks, args.rate, ops),
                        "self_time_top": self_time(stacks),
                        "raw": [str(p) for p in outputs],
                    }
            if args.storm:
                result["storm"] = storm_profile(stack, pool, server.pid, spy, out_dir, args)
        finally:
            pool.close()
            seq.close()
    path = out_dir / "profile.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    report(result)
    print(f"\nJSON: {path}")
    return 0


def report(result: dict[str, Any]) -> None:
    cpu = result["cpu"]
    columns = list(cpu)
    print("\nCPU ms per op by process, closed loop (2 cores shared by everything):")
    names = sorted({n for column in columns for n in cpu[column]["cpu_ms_per_op"]})
    print(f"  {'process':36}" + "".join(f"{c:>12}" for c in columns))
    for name in names:
        print(f"  {name:36}" + "".join(f"{cpu[c]['cpu_ms_per_op'].get(name, 0):12.2f}" for c in columns))
    print(f"  {'total':36}" + "".join(f"{cpu[c]['total_cpu_ms_per_op']:12.1f}" for c in columns))
    print(
        f"  {'ops/s':36}"
        + "".join(f"{sum(cpu[c]['ops_per_s']) / len(cpu[c]['ops_per_s']):12.1f}" for c in columns)
    )
    sql = result["sql"]
    print(
        f"\nSQL per broker start+finish: {sql['statements_per_op']} statements, "
        f"{sql['commits_per_op']} commits"
    )
    for kind, count in sql["by_kind_per_op"].items():
        print(f"  {count:6.2f}  {kind}")
    print(f"  (scheduler alone: {sql['scheduler_statements_per_s']} statements/s, subtracted)")
    storm = result.get("storm")
    if storm:
        print(
            f"\nExpiry storm, {storm['tasks']} tasks, one scheduler: cleared "
            f"{storm['cleared_s_after_deadline']} s "
            f"after the deadline; CPU per expired task {storm['total_cpu_ms_per_expired_task']} ms:"
        )
        for name, ms in sorted(storm["cpu_ms_per_expired_task"].items(), key=lambda kv: -kv[1]):
            print(f"  {ms:7.2f} ms  {name}")
        wall = storm.get("scheduler_wall")
        if wall:
            print(
                "  scheduler revoke threads, wall per expired task "
                f"({wall['request_thread_ms_per_op']:.1f} ms):"
            )
            for name, ms in list(wall["buckets_ms_per_op"].items())[:12]:
                print(f"    {ms:7.2f} ms  {wall['buckets_share'][name] * 100:5.1f}%  {name}")
    inproc = result.get("inprocess")
    if inproc:
        print(
            f"\nInstrumented, in-process, 1 thread: {inproc['wall_ms_per_op']:.1f} ms wall per op, "
            f"process CPU {inproc['process_user_ms_per_op']:.1f} user + "
            f"{inproc['process_sys_ms_per_op']:.1f} sys ms per op"
        )
        print(f"  {'calls':>6} {'wall ms':>8} {'cpu ms':>7}  (exclusive, per op)")
        for label, row in inproc["by_label"].items():
            print(
                f"  {row['calls_per_op']:6.2f} {row['wall_ms_per_op']:8.2f} "
                f"{row['cpu_ms_per_op']:7.2f}  {label}"
            )
    for tag in ("wall", "cpu"):
        prof = result.get(f"pyspy_{tag}")
        if not prof:
            continue
        b = prof["breakdown"]
        what = (
            "wall, incl. waiting"
            if tag == "wall"
            else "'active' per py-spy, which counts threads blocked in libpq as active: "
            "the instrumented CPU column above is the reliable CPU split"
        )
        print(
            f"\npy-spy {tag}: {prof['ops_per_s']:.1f} ops/s; request threads "
            f"{b['request_thread_ms_per_op']:.1f} ms per op ({what})"
        )
        for name, ms in b["buckets_ms_per_op"].items():
            print(f"  {ms:7.2f} ms  {b['buckets_share'][name] * 100:5.1f}%  {name}")
        if tag == "cpu":
            print("  top self time (all threads of the workers):")
            for name, share in prof["self_time_top"][:15]:
                print(f"    {share * 100:5.1f}%  {name}")


if __name__ == "__main__":
    sys.exit(main())
