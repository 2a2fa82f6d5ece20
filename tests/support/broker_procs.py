"""Real `broker serve` / `broker scheduler` processes for fault tests, and /proc helpers.

Each process runs in its own session (process group), so `stop()` can end the master,
its gunicorn workers and the scheduler it spawned, by that one group id and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[2]
_SCRUBBED_ENV = (
    "BROKER_CONFIG",
    "BROKER_DATABASE_URL",
    "BROKER_VAULT_ADDR",
    "BROKER_VAULT_TOKEN",
    "BROKER_POLICY_FILE",
    "VAULT_TOKEN",
    "VAULT_ADDR",
    "PROMETHEUS_MULTIPROC_DIR",
)


def interruptible(args: list[str], **options: Any) -> subprocess.Popen[str]:
    """`subprocess.Popen` for a child the test stops with Ctrl-C (SIGINT).

    A suite started in the background (`make test &`) runs with SIGINT ignored, which a
    child inherits, and a Python started that way never turns SIGINT into
    KeyboardInterrupt. A handler (unlike "ignored") is reset to the default across exec,
    so one is set for the moment of the spawn (the main thread's; no `preexec_fn`, which
    is unsafe with the server threads a test runs)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(args, **options)
    finally:
        signal.signal(signal.SIGINT, previous)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class BrokerProcess:
    """`python -m broker <args> --config <file>`, output in `log_path`."""

    def __init__(self, args: list[str], config: Path, log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self.url = ""
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", *args, "--config", str(config)],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @classmethod
    def serve(
        cls, config: Path, log_path: Path, *, workers: int = 1, threads: int = 2, scheduler: bool = True
    ) -> BrokerProcess:
        port = free_port()
        args = ["serve", "--bind", f"127.0.0.1:{port}", "--workers", str(workers), "--threads", str(threads)]
        if not scheduler:
            args.append("--no-scheduler")
        process = cls(args, config, log_path)
        process.url = f"http://127.0.0.1:{port}"
        return process

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.args[0]} exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"{self.args[0]} not healthy after {timeout}s:\n{self.log_tail()}")

    def descendants(self) -> set[int]:
        return descendants_of(self.pid)

    def stop(self, timeout: float = 8.0) -> None:
        if self.proc.poll() is None:
            # SIGINT: gunicorn's quick shutdown (SIGTERM waits out keep-alives); the
            # scheduler treats it like SIGTERM. Tests need no graceful drain.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        # Whatever is left of this process group (a worker or the scheduler child).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self._log.close()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (2nd field) is in parentheses and may hold spaces.
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants_of(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _ppid(int(entry.name))
            if parent is not None:
                parents[int(entry.name)] = parent
    found: set[int] = set()
    frontier = {root}
    while frontier:
        children = {pid for pid, parent in parents.items() if parent in frontier and pid not in found}
        found |= children
        frontier = children
    return found


def _socket_inodes(local_port: int, remote_port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                local, remote, inode = fields[1], fields[2], fields[9]
                if (
                    int(local.rsplit(":", 1)[1], 16) == local_port
                    and int(remote.rsplit(":", 1)[1], 16) == remote_port
                ):
                    inodes.add(inode)
    return inodes


def pid_with_connection(local_port: int, remote_port: int, candidates: set[int]) -> int | None:
    """Which of `candidates` holds the TCP connection local_port -> remote_port."""
    wanted = {f"socket:[{inode}]" for inode in _socket_inodes(local_port, remote_port)}
    if not wanted:
        return None
    for pid in candidates:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in wanted:
                        return pid
    return None
