"""Shared plumbing for the benchmarks: one throwaway stack, broker processes, HTTP clients.

Used by `bench/run` (bench/benchmark.py), `bench/storm_replicas.py` and
`bench/profile_broker.py`. Only loopback traffic; everything lives under one temp dir that
is deleted at the end (pass keep=True to keep it for inspection).

The *peer* flow is what an agent does without the broker: log in to OpenBao with its own
JWT (the `jwt/` auth method, bound to the same issuer key the broker trusts), read
`database/creds/analytics-ro`, revoke that lease with `sync: true`. The stack's peer
policy only grants the read, so the bench adds `update` on `sys/leases/revoke` to it (a
bench-only tweak of the throwaway OpenBao, made with the root token).
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import urllib3
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TASK = "analytics-read"
ISSUER_NAME = "spire"
TRUST_DOMAIN = "example.org"
BROKER_AUDIENCE = "credential-broker"
VAULT_AUDIENCE = "openbao"  # what configure_vault binds the jwt role to by default
PEER_ROLE = "agent"
CREDS_PATH = "database/creds/analytics-ro"
OWNER = "bench@example.com"
PURPOSE = "benchmark: read the analytics database"
CONTEXT = {"environment": "staging"}
BIG = 1_000_000

_T0 = time.monotonic()


def progress(message: str) -> None:
    elapsed = time.monotonic() - _T0
    print(f"[{int(elapsed // 60):02d}:{elapsed % 60:04.1f}] {message}", file=sys.stderr, flush=True)


# -- statistics ------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- the signing key both the broker and OpenBao trust ---------------------------------------


@dataclass
class BenchIssuer:
    issuer: str
    kid: str
    private_pem: bytes = field(repr=False)
    public_pem: str
    jwks_path: Path

    @classmethod
    def create(cls, directory: Path, name: str = "bench-spire") -> BenchIssuer:
        key = ec.generate_private_key(ec.SECP256R1())
        kid = uuid.uuid4().hex[:16]
        jwk: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(key.public_key()))
        jwk.update({"kid": kid, "use": "sig", "alg": "ES256"})
        jwks_path = directory / f"{name}-jwks.json"
        jwks_path.write_text(json.dumps({"keys": [jwk]}))
        private_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        public_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(f"https://{name}.bench.local", kid, private_pem, public_pem.decode(), jwks_path)

    def mint(self, sub: str, *, lifetime: int = 4 * 3600) -> str:
        """One JWT for both doors: `aud` carries the broker's and OpenBao's audience."""
        now = int(time.time())
        payload = {
            "iss": self.issuer, "sub": sub, "aud": [BROKER_AUDIENCE, VAULT_AUDIENCE], "iat": now,
            "nbf": now, "exp": now + lifetime, "jti": uuid.uuid4().hex,
        }  # fmt: skip
        return jwt.encode(payload, self.private_pem, algorithm="ES256", headers={"kid": self.kid})


def spiffe(name: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/agents/{name}"


# -- a minimal JSON-over-HTTP client (the same one for every flow) ---------------------------


class HttpError(RuntimeError):
    pass


class Http:
    """Keep-alive JSON client on one urllib3 pool; create it *after* any fork."""

    # gunicorn closes a keep-alive connection idle for 5 s; reusing one the server is closing
    # fails without a response, so connections idle for longer than this are dropped first.
    IDLE_SECONDS = 3.0

    def __init__(self, base: str, maxsize: int = 4) -> None:
        parts = urllib3.util.parse_url(base)
        assert parts.host is not None, f"no host in {base}"
        self._host, self._port, self._maxsize = parts.host, parts.port, maxsize
        self._pool = self._new_pool()
        self._last_use = time.monotonic()

    def _new_pool(self) -> urllib3.HTTPConnectionPool:
        return urllib3.HTTPConnectionPool(
            self._host, self._port, maxsize=self._maxsize, block=True, retries=False, timeout=30.0
        )

    def call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
        expect: Sequence[int] = (200,),
    ) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        all_headers = {"Content-Type": "application/json"} if data is not None else {}
        all_headers.update(headers or {})
        now = time.monotonic()
        if now - self._last_use > self.IDLE_SECONDS:
            self._pool.close()
            self._pool = self._new_pool()
        response = self._pool.urlopen(method, path, body=data, headers=all_headers)
        self._last_use = time.monotonic()
        if response.status not in expect:
            raise HttpError(f"{method} {path}: {response.status} {response.data[:300]!r}")
        if not response.data:
            return {}
        parsed: dict[str, Any] = json.loads(response.data)
        return parsed

    def close(self) -> None:
        self._pool.close()


# -- the three flows -------------------------------------------------------------------------


class Flows:
    """One client's view: a JWT, a broker connection, an OpenBao connection."""

    def __init__(self, broker_url: str, vault_addr: str, token: str) -> None:
        self.broker = Http(broker_url)
        self.vault = Http(vault_addr)
        self.jwt = token
        self._auth = {"Authorization": f"Bearer {token}"}
        self._ready: tuple[str, float] | None = None

    def close(self) -> None:
        self.broker.close()
        self.vault.close()

    # peer: login, read, revoke
    def peer_login(self) -> str:
        reply = self.vault.call("POST", "/v1/auth/jwt/login", body={"role": PEER_ROLE, "jwt": self.jwt})
        return str(reply["auth"]["client_token"])

    def read_and_revoke(self, vault_token: str) -> None:
        headers = {"X-Vault-Token": vault_token}
        creds = self.vault.call("GET", f"/v1/{CREDS_PATH}", headers=headers)
        self.vault.call(
            "PUT",
            "/v1/sys/leases/revoke",
            body={"lease_id": creds["lease_id"], "sync": True},
            headers=headers,
            expect=(200, 204),
        )

    def peer(self) -> None:
        self.read_and_revoke(self.peer_login())

    # floor: read + revoke with a token that is already there
    def floor(self) -> None:
        now = time.monotonic()
        if self._ready is None or now - self._ready[1] > 600:  # login tokens live 900 s
            self._ready = (self.peer_login(), now)
        self.read_and_revoke(self._ready[0])

    # broker: start + finish of a one-credential task
    def start(self, ttl: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"task": TASK, "owner": OWNER, "purpose": PURPOSE, "context": CONTEXT}
        if ttl is not None:
            body["ttl_seconds"] = ttl
        return self.broker.call("POST", "/task/start", body=body, headers=self._auth, expect=(201,))

    def finish(self, task_id: str) -> dict[str, Any]:
        return self.broker.call("POST", "/task/finish", body={"task_id": task_id}, headers=self._auth)

    def broker_op(self) -> None:
        started = self.start()
        finished = self.finish(started["task_id"])
        if finished["state"] != "finished" or any(
            lease["state"] != "revoked" for lease in finished["leases"]
        ):
            raise HttpError(f"finish did not revoke: {finished['state']}")

    # frame: two requests that do no work (GET /healthz), through the same server, client and
    # keep-alive connection: what HTTP, gunicorn, Flask and the request hooks cost per op.
    def frame(self) -> None:
        for _ in range(2):
            self.broker.call("GET", "/healthz", headers=self._auth)

    def run(self, flow: str) -> None:
        getattr(self, "broker_op" if flow == "broker" else flow)()


# -- the stack and broker processes ----------------------------------------------------------


def bench_policy(ttl_max: int = 3600) -> dict[str, Any]:
    """The demo `analytics-read` (same matchers, CEL rule and credential) with limits that
    a benchmark won't hit."""
    return {
        "tasks": {
            TASK: {
                "description": "Read the analytics database (benchmark copy, high limits)",
                "ttl": {"default": 300, "max": ttl_max},
                "workloads": [{"issuer": ISSUER_NAME, "subject": f"spiffe://{TRUST_DOMAIN}/agents/*"}],
                "owners": ["*@example.com"],
                "when": ['request.context.environment in ["dev", "staging", "prod"]'],
                "limits": {"max_active_per_workload": BIG, "max_starts_per_minute": BIG},
                "credentials": {"db": {"kind": "database", "mount": "database", "role": "analytics-ro"}},
            }
        }
    }


def _peer_policy_with_revoke() -> str:
    from broker.dev.stack.vault_setup import render_peer_policy

    return render_peer_policy("database", "pki") + (
        "# bench: the agent revokes its own lease when done\n"
        'path "sys/leases/revoke" {\n  capabilities = ["update"]\n}\n'
    )


def _terminate_group(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """SIGTERM the process group we started (the master forwards to its workers)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@dataclass
class BrokerProcess:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path
    kind: str  # serve | scheduler

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        _terminate_group(self.proc)


class BenchStack:
    """A throwaway Postgres + OpenBao (with the jwt auth method) + broker config."""

    def __init__(self, *, sweep_seconds: float = 1.0, keep: bool = False, ttl_max: int = 3600) -> None:
        from broker.dev.stack import start_stack

        self.keep = keep
        self.workdir = Path(tempfile.mkdtemp(prefix="broker-bench-"))
        self.processes: list[BrokerProcess] = []
        self.issuer = BenchIssuer.create(self.workdir)
        progress(f"starting Postgres + OpenBao under {self.workdir}")
        self.stack = start_stack(
            self.workdir / "stack",
            jwt_jwks_pem_keys=[self.issuer.public_pem],
            jwt_bound_issuer=self.issuer.issuer,
        )
        self.vault_addr = self.stack.vault.addr
        self.root = Http(self.vault_addr)
        self.root_headers = {"X-Vault-Token": self.stack.openbao.root_token}
        self.root.call(
            "PUT",
            "/v1/sys/policies/acl/peer-analytics",
            body={"policy": _peer_policy_with_revoke()},
            headers=self.root_headers,
            expect=(200, 204),
        )
        self.policy_path = self.workdir / "bench-policy.yaml"
        self.policy_path.write_text(yaml.safe_dump(bench_policy(ttl_max), sort_keys=False))
        self.config_path = self.workdir / "broker.yaml"
        config = {
            "database_url": self.stack.database_url,
            "vault": {
                "addr": self.vault_addr,
                "auth": {"method": "token", "token": self.stack.vault.broker_token},
            },
            "policy_file": str(self.policy_path),
            "issuers": [
                {
                    "name": ISSUER_NAME, "issuer": self.issuer.issuer,
                    "jwks_file": str(self.issuer.jwks_path), "audiences": [BROKER_AUDIENCE],
                    "kind": "spiffe", "trust_domain": TRUST_DOMAIN, "use": "workload",
                }
            ],
            "operators": {"groups": ["sre"]},
            "scheduler": {"sweep_interval_seconds": sweep_seconds},
            "log_level": "WARNING",
        }  # fmt: skip
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    @property
    def dsn(self) -> str:
        return self.stack.database_url.replace("postgresql+psycopg://", "postgresql://")

    def connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.dsn, autocommit=True)

    def serve(
        self, *, workers: int = 2, threads: int = 4, scheduler: bool = True,
        config: Path | None = None, code: Path = ROOT,
    ) -> BrokerProcess:  # fmt: skip
        """`broker serve` with its scheduler; `code`: the tree whose `broker` package runs
        (`python -m` imports it from the working directory), `config`: another broker.yaml."""
        from broker.dev.stack.postgres import free_port

        port = free_port()
        command = [
            sys.executable, "-m", "broker", "serve", "--config", str(config or self.config_path),
            "--bind", f"127.0.0.1:{port}", "--workers", str(workers), "--threads", str(threads),
        ]  # fmt: skip
        if not scheduler:
            command.append("--no-scheduler")
        return self._spawn(command, f"http://127.0.0.1:{port}", "serve", code)

    def scheduler(self) -> BrokerProcess:
        command = [sys.executable, "-m", "broker", "scheduler", "--config", str(self.config_path)]
        return self._spawn(command, "", "scheduler")

    def _spawn(self, command: list[str], url: str, kind: str, code: Path = ROOT) -> BrokerProcess:
        log_path = self.workdir / f"{kind}-{len(self.processes)}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=code,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )
        process = BrokerProcess(proc, url, log_path, kind)
        self.processes.append(process)
        if url:
            self._wait_ready(process)
        return process

    def _wait_ready(self, process: BrokerProcess, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        http = Http(process.url)
        try:
            while time.monotonic() < deadline:
                if process.proc.poll() is not None:
                    raise RuntimeError(f"broker exited at start-up; see {process.log_path}")
                with contextlib.suppress(Exception):
                    http.call("GET", "/readyz")
                    return
                time.sleep(0.2)
        finally:
            http.close()
        raise RuntimeError(f"broker not ready at {process.url}; see {process.log_path}")

    def stop_processes(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()

    def close(self) -> None:
        self.stop_processes()
        self.root.close()
        self.stack.stop()
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def bench_stack(**options: Any) -> Iterator[BenchStack]:
    stack = BenchStack(**options)
    try:
        yield stack
    finally:
        progress("stopping the stack")
        stack.close()


# -- processes and memory --------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may hold spaces, so split after the last ')'
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def gunicorn_workers(master: int) -> tuple[list[int], list[int]]:
    """(worker pids, scheduler pids) among the master's children."""
    workers: list[int] = []
    schedulers: list[int] = []
    for child in children_of(master):
        (schedulers if " scheduler" in cmdline(child) else workers).append(child)
    return workers, schedulers


def process_groups(
    stack: BenchStack, master: int, clients: list[int], *, broker_db: str = "broker"
) -> dict[str, list[int]]:
    """Every process of the stack by role: the broker's gunicorn workers, its scheduler and
    master, OpenBao, the Postgres backends of the broker's database (`broker_db`), of the
    target database (Vault's plugin) and the rest of Postgres, and the bench clients."""
    workers, schedulers = gunicorn_workers(master)
    groups: dict[str, list[int]] = collections.defaultdict(list)
    groups["broker workers"] = workers
    groups["broker scheduler"] = schedulers
    groups["broker master"] = [master]
    groups["clients (bench)"] = clients
    port = stack.vault_addr.rsplit(":", 1)[1]
    data_dir = str(stack.stack.postgres.data_dir)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid, cmd = int(entry.name), cmdline(int(entry.name))
        if "server -dev" in cmd and f"127.0.0.1:{port}" in cmd:
            groups["openbao"].append(pid)
        elif cmd.startswith("postgres: "):
            # postgres: <user> <db> <host> ... for backends; background processes otherwise.
            parts = cmd.split()
            if len(parts) > 2 and parts[2] == broker_db:
                groups["postgres: broker db"].append(pid)
            elif len(parts) > 2 and parts[2] == "analytics":
                groups["postgres: target db (Vault plugin)"].append(pid)
            else:
                groups["postgres: other"].append(pid)
        elif data_dir in cmd:
            groups["postgres: other"].append(pid)
    return groups


# The broker's own CPU: what it adds to the box beyond the Vault and target-database work
# a peer causes too (bench/PROFILE.md).
OWN_GROUPS = ("broker workers", "broker scheduler", "postgres: broker db")


class CpuMeter:
    """CPU seconds (utime+stime from /proc) each group of processes used between `start`
    and `stop`; processes born in between count from zero, ones that died are lost."""

    def __init__(self, groups: Callable[[], dict[str, list[int]]]) -> None:
        self._groups = groups
        self._before: dict[int, float] = {}

    def start(self) -> None:
        self._before = {pid: cpu_seconds(pid) for pids in self._groups().values() for pid in pids}

    def stop(self, ops: int) -> dict[str, float]:
        """CPU ms per op by group, for `ops` ops done since `start`."""
        per_op = {}
        for name, pids in self._groups().items():
            used = sum(max(0.0, cpu_seconds(pid) - self._before.get(pid, 0.0)) for pid in pids)
            per_op[name] = used * 1000 / max(1, ops)
        return per_op
