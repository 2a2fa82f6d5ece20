"""`broker exec`: run a command with a task's credentials in its environment, then finish the task.

The command runs as a child, never by exec(), because the task must be finished when it
ends: that is what revokes the credentials at once instead of at the deadline. So the
wrapper stays in between, forwards SIGINT/SIGTERM/SIGHUP to the child, and finishes with
an outcome taken from how the child ended:

    exit 0 -> succeeded;  a signal we received, then a nonzero end -> cancelled;  else failed

and answers the child's status (128+N when it died of signal N), like a shell. Its own
failures (the broker refused, no approval) answer 125, a command that can't be run 126 or
127, as env(1) and docker do. Secrets go to the child's environment only; they reach the
disk only with `--env-file`, which is created 0600, exclusively, and removed afterwards.
Nothing here ever prints a secret value: only task ids, names and deadlines.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any, TextIO

from broker.client.env import credential_env, render_templates
from broker.client.errors import ApprovalDenied, ApprovalTimeout, BrokerError
from broker.client.sdk import BrokerClient, Outcome

WRAPPER_FAILED = 125
CANNOT_EXECUTE = 126
NOT_FOUND = 127
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Interrupted(BaseException):
    """Raised by the signal handler while we only wait for an approval (nothing to protect)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Signals:
    """SIGINT/SIGTERM/SIGHUP handling for each phase of the wrapper's life.

    While starting a task the signal is only noted (an answer lost mid-start would leave a
    task we know nothing of); while waiting for approval it interrupts the wait; while the
    child runs it is forwarded to the child.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self.child: subprocess.Popen[bytes] | None = None
        self.interruptible = False
        self._unforwarded: list[int] = []
        self._previous: dict[int, Any] = {}
        # In a terminal's foreground group Ctrl-C reaches the child straight from the
        # terminal (it shares our process group); sending it a second SIGINT would make
        # many programs skip their own clean-up ("press Ctrl-C again to force").
        self._tty_sends_sigint = _in_terminal_foreground()

    def __enter__(self) -> _Signals:
        for signum in FORWARDED:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if self.child is not None and self.child.poll() is None:
            self._forward(signum)
        elif self.interruptible:
            raise _Interrupted(signum)
        else:
            self._unforwarded.append(signum)

    def forward_missed(self) -> None:
        """A signal that came while the child was being spawned, before it could be forwarded."""
        if self._unforwarded:
            self._forward(self._unforwarded[-1])
            self._unforwarded.clear()

    def _forward(self, signum: int) -> None:
        if self.child is None or (signum == signal.SIGINT and self._tty_sends_sigint):
            return
        with contextlib.suppress(ProcessLookupError):
            self.child.send_signal(signum)


def _in_terminal_foreground() -> bool:
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            if os.isatty(fd):
                return os.tcgetpgrp(fd) == os.getpgrp()
    return False


def run(
    client: BrokerClient,
    *,
    task: str,
    owner: str,
    purpose: str,
    context: Mapping[str, Any] | None,
    ttl: int | None,
    wait: float | None,
    env_templates: Sequence[str],
    env_file: str | None,
    command: Sequence[str],
    stderr: TextIO | None = None,
) -> int:
    """Start `task`, run `command` with its credentials, finish the task; the command's status."""
    wrapper = _Wrapper(client, stderr or sys.stderr)
    if not command:
        wrapper.say("no command given (put it after --)")
        return WRAPPER_FAILED
    env_fd = None
    if env_file is not None:
        try:
            # Created before the task starts: an existing file fails before anything is issued.
            env_fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError as error:
            wrapper.say(f"cannot create --env-file {env_file}: {error.strerror}")
            return WRAPPER_FAILED
    try:
        with wrapper.signals:
            answer = wrapper.start(task, owner, purpose, context, ttl, wait)
            if isinstance(answer, int):
                return answer
            return wrapper.run_command(task, answer, env_templates, env_fd, command)
    finally:
        if env_fd is not None:
            with contextlib.suppress(OSError):
                os.close(env_fd)
        if env_file is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(env_file)


class _Wrapper:
    def __init__(self, client: BrokerClient, out: TextIO) -> None:
        self.client = client
        self.out = out
        self.signals = _Signals()

    def say(self, message: str) -> None:
        print(f"broker exec: {message}", file=self.out, flush=True)

    def start(
        self,
        task: str,
        owner: str,
        purpose: str,
        context: Mapping[str, Any] | None,
        ttl: int | None,
        wait: float | None,
    ) -> dict[str, Any] | int:
        """The active task's answer (claimed if it needed approval), or the status to exit with."""
        try:
            answer = self.client.start(task, owner=owner, purpose=purpose, context=context, ttl=ttl)
        except BrokerError as error:
            self.say(f"cannot start {task}: {error}")
            return WRAPPER_FAILED
        task_id = str(answer["task_id"])
        if self.signals.received:
            self.finish(task_id, "cancelled", answer.get("expires_at"))
            return 128 + self.signals.received[0]
        if answer.get("state") != "pending_approval":
            return answer
        if wait is None:
            self.say(
                f"task {task_id} needs approval; withdrawn (run again with --wait SECONDS to wait for it)"
            )
            self.finish(task_id, "cancelled", None)
            return WRAPPER_FAILED
        until = answer.get("approval_expires_at")
        self.say(f"task {task_id} waits for approval (until {until}); waiting up to {wait:g}s")
        return self._await_approval(task_id, wait)

    def _await_approval(self, task_id: str, wait: float) -> dict[str, Any] | int:
        status = WRAPPER_FAILED
        self.signals.interruptible = True
        try:
            answer = self.client.wait_for_approval(task_id, timeout=wait)
        except _Interrupted as interrupted:
            status, message = 128 + interrupted.signum, f"interrupted while waiting for task {task_id}"
        except ApprovalDenied as error:
            self.say(error.detail)
            return WRAPPER_FAILED
        except ApprovalTimeout as error:
            message = f"{error.detail}; withdrawn"
        except BrokerError as error:
            message = f"cannot claim task {task_id}: {error}"
        else:
            self.say(f"task {task_id} approved and claimed")
            return answer
        finally:
            self.signals.interruptible = False
        self.say(message)
        self.finish(task_id, "cancelled", None)
        return status

    def run_command(
        self,
        task: str,
        answer: Mapping[str, Any],
        env_templates: Sequence[str],
        env_fd: int | None,
        command: Sequence[str],
    ) -> int:
        task_id, expires_at = str(answer["task_id"]), str(answer["expires_at"])
        credentials = answer.get("credentials") or {}
        try:
            task_env = credential_env(credentials, task_id, expires_at)
            task_env.update(render_templates(env_templates, {**os.environ, **task_env}))
        except ValueError as error:
            self.say(str(error))
            self.finish(task_id, "cancelled", expires_at)
            return WRAPPER_FAILED
        if env_fd is not None:
            # Shell syntax: `set -a; . FILE` reads every value back exactly, newlines included.
            os.write(
                env_fd, "".join(f"{name}={shlex.quote(value)}\n" for name, value in task_env.items()).encode()
            )
        kinds = ", ".join(f"{name} ({item.get('kind')})" for name, item in sorted(credentials.items()))
        self.say(f"task {task_id} ({task}) active until {expires_at}; credentials: {kinds or 'none'}")
        if self.signals.received:
            self.finish(task_id, "cancelled", expires_at)
            return 128 + self.signals.received[0]
        try:
            child = self.signals.child = subprocess.Popen(list(command), env={**os.environ, **task_env})
            self.signals.forward_missed()
        except OSError as error:
            self.say(f"cannot run {command[0]}: {error.strerror}")
            self.finish(task_id, "failed", expires_at)
            return NOT_FOUND if isinstance(error, FileNotFoundError) else CANNOT_EXECUTE
        returncode = child.wait()
        outcome: Outcome = "succeeded"
        if returncode != 0:
            # A child that ends badly after we passed it a signal was stopped, not broken.
            outcome = "cancelled" if self.signals.received else "failed"
        self.finish(task_id, outcome, expires_at)
        return 128 - returncode if returncode < 0 else returncode

    def finish(self, task_id: str, outcome: Outcome, expires_at: object) -> None:
        """Finish (the client retries it); a failure is reported, never raised: the deadline still holds."""
        try:
            answer = self.client.finish(task_id, outcome)
        except BrokerError as error:
            until = f" until {expires_at}" if expires_at else ""
            self.say(
                f"could not finish task {task_id} ({error}); its credentials stay valid{until}, "
                "when the broker revokes them; an operator can revoke the task now"
            )
            return
        pending = [lease["name"] for lease in answer.get("leases", []) if lease.get("state") != "revoked"]
        if pending:
            self.say(
                f"task {task_id} finished ({outcome}); Vault revocation pending for {', '.join(pending)}"
            )
        else:
            self.say(f"task {task_id} finished ({outcome}); credentials revoked")
