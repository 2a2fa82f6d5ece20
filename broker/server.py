"""`broker serve`: gunicorn with the app, plus one scheduler process per replica (and one
gateway process when `gateway:` is configured).

The scheduler never runs inside a request worker: with N workers it would sweep N times
(flask-apscheduler#51). It runs as a sibling process that `broker serve` starts and stops,
and that the master starts again if it dies. SIGHUP to the master reloads the policy in
every worker and in the scheduler, without restarting anything; a bad policy file is
logged and the old policy stays.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gunicorn import util as gunicorn_util
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.workers.gthread import ThreadWorker

from broker.api.problems import server_refusal
from broker.config import Settings

log = logging.getLogger(__name__)


def _reload_policy_in_worker(worker: Any) -> None:
    def on_hup(_signum: int, _frame: Any) -> None:
        services = worker.wsgi.extensions["broker.services"]
        services.policies.reload()

    signal.signal(signal.SIGHUP, on_hup)


def _prepare_worker(worker: Any) -> None:
    _reload_policy_in_worker(worker)
    # gunicorn answers what it refuses before the app (a URI over its limit, a broken
    # request line or header) with an HTML page from `util.write_error`, which its error
    # handler looks up on the module at each call; every error is problem+json (docs/contract.md §5),
    # so in a worker process those are answered in that shape too.
    gunicorn_util.write_error = _write_problem


def _write_problem(sock: Any, status: int, _reason: str, _message: str) -> None:
    gunicorn_util.write_nonblock(sock, server_refusal(status))


def _mark_dead_for_metrics(_server: Any, worker: Any) -> None:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


# Idle keep-alive connections each worker keeps open: clients (agents, load balancers)
# reuse them instead of paying a TCP handshake, and the accept herd, per request.
KEEPALIVE_CONNECTIONS = 64


class _FramingGuard:
    """A request body that marks its connection for closing if reading it raises.

    A chunked body whose framing is broken (answered 400 by `broker.api.common`) leaves
    the connection at an unknown position: reading on for a next request would parse the
    rest of the garbage as one, and answer it too. gunicorn drops a `Connection` header the
    app sets, so the request itself is marked, which also makes the answer say `close`.
    """

    def __init__(self, req: Any) -> None:
        self._req = req
        self._body = req.body

    def _guarded(self, call: Any, size: int | None) -> Any:
        try:
            return call(size)
        except Exception:
            self._req.must_close = True
            raise

    def read(self, size: int | None = None) -> bytes:
        data: bytes = self._guarded(self._body.read, size)
        return data

    def readline(self, size: int | None = None) -> bytes:
        data: bytes = self._guarded(self._body.readline, size)
        return data

    def readlines(self, size: int | None = None) -> list[bytes]:
        lines: list[bytes] = self._guarded(self._body.readlines, size)
        return lines

    def __iter__(self) -> _FramingGuard:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._body, name)


class BrokerThreadWorker(ThreadWorker):  # type: ignore[misc]
    """gunicorn's gthread worker that stops accepting exactly when its threads are busy.

    Stock gthread counts idle keep-alive connections against `worker_connections`, so
    there is no setting that allows keep-alive and still stops a worker whose threads
    are all stuck (a slow Vault) from accepting connections it can't serve, which then
    queue while another worker sits idle. Here the limit moves with the idle keep-alive
    connections: a worker accepts while fewer than `threads` connections are in flight.
    """

    @property
    def worker_connections(self) -> int:
        return int(self.cfg.threads) + len(self.keepalived_conns)

    @worker_connections.setter
    def worker_connections(self, _configured: int) -> None:
        """gunicorn assigns the configured number; the property above replaces it."""

    def handle_request(self, req: Any, conn: Any) -> bool:
        req.body = _FramingGuard(req)
        keep_alive: bool = super().handle_request(req, conn)
        return keep_alive


# A sibling (the scheduler, the gateway) that dies is started again; one that dies soon
# after each start (its database unreachable, say) waits longer every time, so the master
# doesn't spin on it.
SIBLING_BACKOFF_SECONDS = 1.0
SIBLING_BACKOFF_MAX_SECONDS = 30.0
SIBLING_STABLE_SECONDS = 60.0


class Sibling:
    """A process `broker serve` runs beside its workers (`broker scheduler`, `broker gateway`)."""

    def __init__(self, command: str, config_path: str | None) -> None:
        self.command = command
        self._config_path = config_path
        self.process: subprocess.Popen[bytes] | None = None
        self._started = 0.0
        self._backoff = SIBLING_BACKOFF_SECONDS
        self._restart_at: float | None = None

    def start(self) -> Sibling:
        argv = [sys.executable, "-m", "broker", self.command]
        if self._config_path:
            argv += ["--config", str(Path(self._config_path).resolve())]
        self.process = subprocess.Popen(argv)
        self._started = time.monotonic()
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signum)

    def poll(self) -> None:
        if self.process is not None:
            self.process.poll()

    def restart_if_dead(self) -> None:
        if self.process is None or self.process.poll() is None:
            return
        now = time.monotonic()
        if self._restart_at is None:
            if now - self._started >= SIBLING_STABLE_SECONDS:
                self._backoff = SIBLING_BACKOFF_SECONDS
            code = self.process.returncode
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            log.error(
                "the %s (pid %d) %s; starting a new one in %.0f s",
                self.command,
                self.process.pid,
                how,
                self._backoff,
            )
            self._restart_at = now + self._backoff
            self._backoff = min(2 * self._backoff, SIBLING_BACKOFF_MAX_SECONDS)
        elif now >= self._restart_at:
            self._restart_at = None
            self.start()
            assert self.process is not None
            log.warning("started a new %s (pid %d)", self.command, self.process.pid)

    def stop(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()


class BrokerArbiter(Arbiter):  # type: ignore[misc]
    siblings: tuple[Sibling, ...] = ()

    def handle_hup(self) -> None:
        log.info("SIGHUP: reloading the policy in %d workers", len(self.WORKERS))
        for pid in list(self.WORKERS):
            os.kill(pid, signal.SIGHUP)
        for sibling in self.siblings:
            sibling.signal(signal.SIGHUP)

    def reap_workers(self) -> None:
        # gunicorn reaps every child with waitpid(-1), which would take a sibling's exit
        # status from Popen (it then reports 0); waiting for its pid first keeps it.
        for sibling in self.siblings:
            sibling.poll()
        super().reap_workers()

    def manage_workers(self) -> None:
        # Runs about once a second in the master's loop, and never once it is stopping.
        super().manage_workers()
        for sibling in self.siblings:
            sibling.restart_if_dead()


def default_pid_file(bind: str) -> Path:
    """Where `broker serve --bind ...:PORT` writes its master's pid unless told otherwise.

    One file per port, so replicas on one host don't share one; in the user's runtime
    directory, else a private directory under the temp dir.
    """
    port = bind.rpartition(":")[2] or "default"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = (
        Path(runtime) / "credential-broker"
        if runtime
        else Path(tempfile.gettempdir()) / f"credential-broker-{os.getuid()}"
    )
    return base / f"serve-{port}.pid"


def master_pid(pid_file: Path) -> int | None:
    """The pid in `pid_file` if that process is alive and is a `broker serve` master.

    A stale file (the master was killed) may name a pid the system has since given to
    another process; that one must not get our SIGHUP.
    """
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    names = [Path(arg.decode(errors="replace")).name for arg in argv]
    # `python -m broker serve ...` or `broker serve ...`; or gunicorn's process title.
    serving = any(names[i : i + 2] == ["broker", "serve"] for i in range(len(names)))
    return pid if serving or any(b"credential-broker" in arg for arg in argv) else None


def port_in_use(bind: str) -> bool:
    """Whether another process listens on `bind` (HOST:PORT) already.

    Checked before gunicorn starts: it would retry for seconds, log "Connection in use"
    and exit, while whatever holds the port goes on answering in our place.
    """
    host, _, port = bind.rpartition(":")
    if not port.isdigit() or host.startswith("unix"):
        return False
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 (only probed, as gunicorn would bind it)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As gunicorn binds: SO_REUSEADDR lets a port in TIME_WAIT go, never a listening one.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(port)))
        except OSError as error:
            return error.errno == errno.EADDRINUSE
    return False


def _write_pid_file(path: Path) -> Any:
    def when_ready(arbiter: Any) -> None:
        # Written once the port is bound: a serve that fails to bind leaves no file behind.
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        staged = path.with_name(f".{path.name}.{arbiter.pid}")
        staged.write_text(f"{arbiter.pid}\n")
        staged.replace(path)
        log.info("master pid %d written to %s (broker reload sends it SIGHUP)", arbiter.pid, path)

    return when_ready


def _remove_pid_file(path: Path) -> Any:
    def on_exit(arbiter: Any) -> None:
        try:
            if path.read_text().strip() == str(arbiter.pid):
                path.unlink()
        except OSError:
            pass

    return on_exit


class BrokerApplication(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings, options: dict[str, Any], pid_file: Path | None = None) -> None:
        self._settings = settings
        self._options = options
        self._pid_file = pid_file
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)
        if "control_socket_disable" in self.cfg.settings:
            # gunicorn >= 25 opens a control socket at one path per user ($HOME/.gunicorn):
            # a second replica on the host would take it over, and the broker has no use
            # for runtime worker changes from outside (SIGHUP and SIGTERM are its interface).
            self.cfg.set("control_socket_disable", True)
        self.cfg.set("post_worker_init", _prepare_worker)
        self.cfg.set("child_exit", _mark_dead_for_metrics)
        if self._pid_file is not None:
            self.cfg.set("when_ready", _write_pid_file(self._pid_file))
            self.cfg.set("on_exit", _remove_pid_file(self._pid_file))

    def load(self) -> Any:
        # Runs in each worker after the fork: pools and sessions are per process.
        from broker.app import create_app

        return create_app(self._settings)

    def run_with(self, siblings: tuple[Sibling, ...]) -> None:
        arbiter = BrokerArbiter(self)
        arbiter.siblings = siblings
        arbiter.run()


def serve(
    settings: Settings,
    config_path: str | None,
    *,
    bind: str,
    workers: int,
    threads: int,
    with_scheduler: bool,
    with_gateway: bool = True,
    pid_file: Path | None = None,
) -> None:
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="broker-metrics-")
    from broker.services import LAST_GOOD_POLICY_ENV

    os.environ.setdefault(
        LAST_GOOD_POLICY_ENV, str(Path(tempfile.mkdtemp(prefix="broker-policy-")) / "policy.yaml")
    )
    siblings = tuple(
        Sibling(command, config_path).start()
        for command, wanted in (("scheduler", with_scheduler), ("gateway", with_gateway and settings.gateway))
        if wanted
    )
    options = {
        "bind": bind,
        "workers": workers,
        "threads": threads,
        "worker_class": "broker.server.BrokerThreadWorker" if threads > 1 else "sync",
        # A worker whose threads are all busy (a slow Vault) stops accepting, so another
        # worker answers /healthz and reads instead of queueing behind it; up to
        # KEEPALIVE_CONNECTIONS idle connections stay open besides (BrokerThreadWorker).
        "worker_connections": threads + KEEPALIVE_CONNECTIONS,
        "timeout": 60,
        "graceful_timeout": 20,
        "keepalive": 5,
        "limit_request_field_size": 16384,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": settings.log_level.lower(),
        "proc_name": "credential-broker",
    }
    try:
        BrokerApplication(settings, options, pid_file).run_with(siblings)
    finally:
        # Not necessarily the ones started here: the master may have restarted them.
        for sibling in siblings:
            sibling.stop()
