"""Client processes for closed-loop load: N forked processes, one HTTP client each.

Processes, not threads: 8 Python client threads would share one GIL in the bench process
and the client, not the server, could end up setting the pace. Each process opens its own
connections after the fork and uses its own workload identity (JWT subject).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from harness import Flows


def _client_main(conn: Connection, broker_url: str, vault_addr: str, token: str) -> None:
    flows = Flows(broker_url, vault_addr, token)
    try:
        while True:
            command = conn.recv()
            kind = command[0]
            if kind == "quit":
                return
            try:
                if kind == "closed":
                    conn.send(_closed_loop(flows, *command[1:]))
                elif kind == "start_many":
                    _, count, ttl = command
                    conn.send({"task_ids": [flows.start(ttl)["task_id"] for _ in range(count)]})
                else:
                    conn.send({"error": f"unknown command {kind}"})
            except Exception:
                conn.send({"error": traceback.format_exc(limit=3)})
    finally:
        flows.close()


def _closed_loop(flows: Flows, flow: str, start_at: float, duration: float) -> dict[str, Any]:
    """Run `flow` back to back from `start_at` for `duration` s (CLOCK_MONOTONIC is system-wide)."""
    delay = start_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    end = start_at + duration
    latencies: list[float] = []
    errors = 0
    first_error = ""
    late = 0
    while True:
        began = time.monotonic()
        if began >= end:
            break
        try:
            flows.run(flow)
        except Exception as error:
            errors += 1
            first_error = first_error or repr(error)[:300]
            time.sleep(0.05)
            continue
        done = time.monotonic()
        if done <= end:
            latencies.append(done - began)
        else:
            late += 1  # in flight at the bell: not counted in the window
    return {"latencies": latencies, "errors": errors, "first_error": first_error, "late": late}


class ClientPool:
    def __init__(self, broker_url: str, vault_addr: str, tokens: list[str]) -> None:
        context = multiprocessing.get_context("fork")
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for token in tokens:
            parent, child = context.Pipe()
            proc = context.Process(
                target=_client_main, args=(child, broker_url, vault_addr, token), daemon=True
            )
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

    def __len__(self) -> int:
        return len(self._conns)

    def _all(self, commands: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
        for conn, command in zip(self._conns, commands, strict=True):
            conn.send(command)
        replies = [conn.recv() for conn in self._conns]
        errors = [reply["error"] for reply in replies if "error" in reply]
        if errors:
            raise RuntimeError(f"client failed: {errors[0]}")
        return replies

    def closed_loop(self, flow: str, duration: float, clients: int | None = None) -> dict[str, Any]:
        """All clients (or the first `clients`) run `flow` for `duration` s, starting together."""
        count = clients or len(self)
        start_at = time.monotonic() + 0.3
        wall_start = time.time() + 0.3
        commands = [("closed", flow, start_at, duration)] * count
        for conn, command in zip(self._conns[:count], commands, strict=True):
            conn.send(command)
        replies = [conn.recv() for conn in self._conns[:count]]
        errors = [reply["error"] for reply in replies if "error" in reply]
        if errors:
            raise RuntimeError(f"client failed: {errors[0]}")
        latencies = [t for reply in replies for t in reply["latencies"]]
        return {
            "flow": flow,
            "clients": count,
            "duration": duration,
            "ops": len(latencies),
            "ops_per_s": len(latencies) / duration,
            "latencies": latencies,
            "errors": sum(reply["errors"] for reply in replies),
            "first_error": next((r["first_error"] for r in replies if r["first_error"]), ""),
            "late": sum(reply["late"] for reply in replies),
            "wall_window": (wall_start, wall_start + duration),
        }

    def start_many(self, total: int, ttl: int) -> list[str]:
        share, extra = divmod(total, len(self))
        commands = [("start_many", share + (1 if i < extra else 0), ttl) for i in range(len(self))]
        return [task_id for reply in self._all(commands) for task_id in reply["task_ids"]]

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(("quit",))
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
