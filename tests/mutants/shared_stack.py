"""pytest plugin for `make mutants`: every mutant's test run uses the stack the runner started.

Loaded with `-p tests.mutants.shared_stack`. When BROKER_MUTANTS_STACK names a JSON file
written by `tests/mutants/run.py`, `broker.dev.stack.start_stack` is replaced before
tests/conftest.py imports it, so the session's `stack` fixture gets handles to the
runner's Postgres and OpenBao instead of starting its own (a few seconds per mutant).
The handles own no process, so the fixture's `stop()` leaves the servers running.

(BROKER_TEST_DATABASE_URL can't do this: an external database has no port for Vault's
database engine, and `configure_vault` would run once per mutant anyway.)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import broker.dev.stack as stack_module
from broker.dev.stack import Stack
from broker.dev.stack.openbao import OpenBaoHandle
from broker.dev.stack.postgres import PostgresHandle
from broker.dev.stack.vault_setup import VaultSetup

ENV = "BROKER_MUTANTS_STACK"


def dump(stack: Stack, path: Path) -> None:
    pg = stack.postgres
    path.write_text(
        json.dumps(
            {
                "postgres": {
                    "workdir": str(pg.workdir),
                    "port": pg.port,
                    "socket_dir": str(pg.socket_dir),
                    "bin_dir": str(pg.bin_dir),
                    "run_as": pg.run_as,
                },
                "openbao": {"addr": stack.openbao.addr, "root_token": stack.openbao.root_token},
                "vault": asdict(stack.vault),
            }
        )
    )


def load(path: Path) -> Stack:
    data = json.loads(path.read_text())
    pg = data["postgres"]
    vault: dict[str, Any] = data["vault"]
    tuples = {f.name for f in fields(VaultSetup) if "tuple" in str(f.type)}
    setup: dict[str, Any] = {k: tuple(v) if k in tuples else v for k, v in vault.items()}
    return Stack(
        postgres=PostgresHandle(
            Path(pg["workdir"]), pg["port"], Path(pg["socket_dir"]), Path(pg["bin_dir"]), pg["run_as"]
        ),
        openbao=OpenBaoHandle(addr=data["openbao"]["addr"], root_token=data["openbao"]["root_token"]),
        vault=VaultSetup(**setup),
    )


if os.environ.get(ENV):
    _shared = load(Path(os.environ[ENV]))

    def _start_stack(workdir: Path, **_: Any) -> Stack:
        return _shared

    stack_module.start_stack = _start_stack
