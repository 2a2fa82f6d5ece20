"""One real Postgres and one real OpenBao per test session; schema made by Alembic.

Each test that touches the ledger starts from empty tables (TRUNCATE), which keeps tests
independent even when the code under test commits, spawns processes or runs threads.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, text

from broker.config import Settings, settings_from_mapping
from broker.dev.stack import Stack, start_stack
from tests.support.tokens import TestIssuer

ROOT = Path(__file__).resolve().parent.parent
DEMO_POLICY = ROOT / "broker" / "dev" / "data" / "policy.yaml"
# Task types the integration tests need (every credential kind, a broken one, short ttls).
TEST_POLICY = ROOT / "tests" / "support" / "policy.yaml"
LEDGER_TABLES = (
    "audit_events, audit_head, approvals, gateway_handles, leases, tasks, used_jtis, scheduler_heartbeats,"
    " task_tokens, locks"
)


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="broker-tests-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def stack(workdir: Path) -> Iterator[Stack]:
    running = start_stack(workdir / "stack")
    yield running
    running.stop()


@pytest.fixture
def empty_database(stack: Stack) -> Iterator[str]:
    """A database of its own on the test Postgres, never migrated; dropped afterwards."""
    name = f"empty_{uuid.uuid4().hex[:8]}"
    stack.postgres.create_database(name)
    yield stack.postgres.url(name)
    stack.postgres.drop_database(name)


@pytest.fixture(scope="session")
def issuers(workdir: Path) -> dict[str, TestIssuer]:
    keys = workdir / "keys"
    keys.mkdir(exist_ok=True)
    return {
        "spire": TestIssuer.create(
            keys,
            name="spire",
            issuer="https://spire.test",
            kind="spiffe",
            trust_domain="example.org",
            use=["workload"],
        ),
        "ci": TestIssuer.create(keys, name="ci", issuer="https://ci.test", use=["workload"]),
        "sso": TestIssuer.create(
            keys, name="corp-sso", issuer="https://sso.test", use=["approver", "operator"]
        ),
    }


def broker_config(
    stack: Stack, issuers: dict[str, TestIssuer], policy_file: Path, **extra: Any
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "database_url": stack.database_url,
        "vault": {
            "addr": stack.vault.addr,
            "auth": {"method": "token", "token": stack.vault.broker_token},
            "timeout_seconds": 3,
        },
        "policy_file": str(policy_file),
        "issuers": [issuer.settings_dict() for issuer in issuers.values()],
        "operators": {"groups": ["sre"]},
        "scheduler": {"sweep_interval_seconds": 0.25, "orphan_grace_seconds": 1},
    }
    config.update(extra)
    return config


@pytest.fixture
def clean_db(stack: Stack) -> Iterator[None]:
    engine = create_engine(stack.database_url)
    with engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {LEDGER_TABLES} RESTART IDENTITY CASCADE"))
    engine.dispose()
    yield


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    target = tmp_path / "policy.yaml"
    shutil.copy(TEST_POLICY, target)
    return target


@pytest.fixture
def settings(stack: Stack, issuers: dict[str, TestIssuer], policy_file: Path, clean_db: None) -> Settings:
    return settings_from_mapping(broker_config(stack, issuers, policy_file), env={})


@pytest.fixture
def config_file(
    tmp_path: Path, stack: Stack, issuers: dict[str, TestIssuer], policy_file: Path, clean_db: None
) -> Path:
    path = tmp_path / "broker.yaml"
    path.write_text(yaml.safe_dump(broker_config(stack, issuers, policy_file)))
    return path


@pytest.fixture
def services(settings: Settings) -> Iterator[Any]:
    from broker.services import build_services

    built = build_services(settings)
    yield built
    built.close()


@pytest.fixture
def running_scheduler(services: Any) -> Iterator[Any]:
    """The real SchedulerRunner on the test's services (its sweeps, its revoke workers)."""
    from broker.scheduler.runner import SchedulerRunner

    runner = SchedulerRunner(services)
    runner.start()
    yield runner
    runner.stop()


@pytest.fixture
def app(services: Any) -> Any:
    from broker.app import create_app

    return create_app(services=services)


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


def pytest_configure(config: pytest.Config) -> None:
    # Property tests draw the same examples on every run: CI can't go red on a draw no one
    # can reproduce, and a failing example is printed for the test that found it.
    from hypothesis import settings as hypothesis_settings

    hypothesis_settings.register_profile("broker", derandomize=True, database=None)
    hypothesis_settings.load_profile("broker")
    # Tests never read a developer's real Vault token or config by accident.
    for var in ("BROKER_CONFIG", "VAULT_TOKEN", "VAULT_ADDR", "BROKER_AUDIT_KEY"):
        os.environ.pop(var, None)
