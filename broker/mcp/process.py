"""Run one command for `run_with_credentials`: no shell, bounded output, a hard timeout.

The command gets its own session (process group), so a timeout, or the server shutting
down, kills everything it started, not only its first process; whatever of the group is
still running when the command exits is killed too, so no child keeps the credentials past
the call. Its stdin is /dev/null: over stdio the server's own stdin is the MCP channel.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO

from broker.mcp.redact import Redactor

OUTPUT_CAP_BYTES = 64 * 1024
# SIGTERM first, so a well-behaved command can clean up; SIGKILL after this long.
KILL_GRACE_SECONDS = 2.0
_CHUNK = 8192


class CommandNotStarted(Exception):
    """The command could not be started (not found, not executable, bad cwd)."""


@dataclass(frozen=True)
class CommandResult:
    exit_status: int | None  # None when it was killed on timeout or shutdown
    timed_out: bool
    stopped: bool  # killed because the server is shutting down
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool


class _Capture:
    """Keeps the first `keep` bytes of a pipe and drains (counts) the rest."""

    def __init__(self, pipe: IO[bytes], keep: int) -> None:
        self.kept = bytearray()
        self.total = 0
        self._pipe, self._keep = pipe, keep
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with self._pipe:
            while chunk := self._pipe.read1(_CHUNK):  # type: ignore[attr-defined]
                self.total += len(chunk)
                room = self._keep - len(self.kept)
                if room > 0:
                    self.kept += chunk[:room]


def run_bounded(
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str | None,
    timeout: float,
    redactor: Redactor,
    stop: threading.Event,
    cap: int = OUTPUT_CAP_BYTES,
) -> CommandResult:
    try:
        child = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as error:
        # strerror only: the message names no environment value.
        raise CommandNotStarted(f"{command[0]!r} could not be started: {error.strerror}") from None
    # Past the cap, keep enough to redact a secret that straddles it.
    keep = cap + redactor.longest
    assert child.stdout is not None and child.stderr is not None
    out, err = _Capture(child.stdout, keep), _Capture(child.stderr, keep)
    timed_out, stopped = _wait(child, timeout, stop)
    # Whatever the command left running in its group must not keep the credentials. (A
    # process group id is not reused while any member of the group is alive.)
    _kill_group(child.pid, signal.SIGKILL)
    _wait_group_gone(child.pid, KILL_GRACE_SECONDS)
    for capture in (out, err):
        capture.thread.join(timeout=KILL_GRACE_SECONDS)
    stdout, stdout_cut = _render(out, cap, redactor)
    stderr, stderr_cut = _render(err, cap, redactor)
    return CommandResult(
        exit_status=None if (timed_out or stopped) else child.returncode,
        timed_out=timed_out,
        stopped=stopped,
        stdout=stdout,
        stderr=stderr,
        stdout_truncated=stdout_cut,
        stderr_truncated=stderr_cut,
    )


def _wait(child: subprocess.Popen[bytes], timeout: float, stop: threading.Event) -> tuple[bool, bool]:
    """Wait for the command; on timeout or `stop`, end its group. Answers (timed_out, stopped)."""
    deadline = time.monotonic() + timeout
    while child.poll() is None:
        if stop.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
            _end_group(child)
            return False, True
        if time.monotonic() >= deadline:
            _end_group(child)
            return True, False
    return False, False


def _end_group(child: subprocess.Popen[bytes]) -> None:
    _kill_group(child.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=KILL_GRACE_SECONDS)
    _kill_group(child.pid, signal.SIGKILL)
    child.wait()


def _wait_group_gone(pgid: int, timeout: float) -> None:
    """SIGKILL is delivered when a process next runs: wait (bounded) until the group is
    empty, so the call answers only once nothing it started runs on. A member its new parent
    has not reaped yet (a zombie) still counts, hence the bound."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.01)


def _kill_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _render(capture: _Capture, cap: int, redactor: Redactor) -> tuple[str, bool]:
    text = redactor(bytes(capture.kept).decode("utf-8", errors="replace"))
    truncated = capture.total > len(capture.kept)
    if len(text) > cap:
        text, truncated = text[:cap], True
    if truncated:
        # The cut may have left the first characters of a secret at the end.
        text = redactor.trim_partial_tail(text)
    return text, truncated
