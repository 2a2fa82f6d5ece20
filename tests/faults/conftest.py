"""Fixtures for fault tests: fault proxies in front of Vault/Postgres, brokers wired to them.

Faults are injected on the network (`HttpFaultProxy`, `TcpProxy`) or with signals to real
processes; Vault (OpenBao) and Postgres are the session's real ones (tests/conftest.py).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.config import settings_from_mapping
from tests.conftest import broker_config
from tests.faults.faultkit import Ledger
from tests.support.broker_procs import BrokerProcess
from tests.support.fault_proxy import HttpFaultProxy

FAULTS_POLICY = Path(__file__).parent / "policy.yaml"


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    target = tmp_path / "policy.yaml"
    shutil.copy(FAULTS_POLICY, target)
    return target


@pytest.fixture
def vault_proxy(stack: Any) -> Iterator[HttpFaultProxy]:
    proxy = HttpFaultProxy.to(stack.vault.addr)
    yield proxy
    proxy.close()


@pytest.fixture
def ledger(stack: Any, clean_db: None) -> Iterator[Ledger]:
    view = Ledger(stack.database_url)
    yield view
    view.close()


@pytest.fixture
def fault_config(
    stack: Any, issuers: Any, policy_file: Path, clean_db: None
) -> Callable[..., dict[str, Any]]:
    """`fault_config(vault_addr=, database_url=, timeout=, vault_options=, **scheduler)`: a broker config."""

    def make(
        *,
        vault_addr: str | None = None,
        database_url: str | None = None,
        timeout: float = 3,
        vault_options: dict[str, Any] | None = None,
        **scheduler: Any,
    ) -> dict[str, Any]:
        config = broker_config(stack, issuers, policy_file, log_level="WARNING")
        if vault_addr is not None:
            config["vault"]["addr"] = vault_addr
        if database_url is not None:
            config["database_url"] = database_url
        config["vault"]["timeout_seconds"] = timeout
        config["vault"].update(vault_options or {})
        config["scheduler"].update(
            {
                "retry_base_seconds": 0.2,
                "retry_max_seconds": 1,
                "reconcile_interval_seconds": 0.5,
                **scheduler,
            }
        )
        return config

    return make


@pytest.fixture
def in_process() -> Iterator[Callable[[dict[str, Any]], Any]]:
    """`in_process(config)`: (services, Flask test client) built in this process."""
    from broker.app import create_app
    from broker.services import build_services

    built: list[Any] = []

    def make(config: dict[str, Any]) -> Any:
        services = build_services(settings_from_mapping(config, env={}))
        built.append(services)
        return services, create_app(services=services).test_client()

    yield make
    for services in built:
        services.close()


@pytest.fixture
def scheduler_for() -> Iterator[Callable[[Any], Any]]:
    """`scheduler_for(services)`: the real SchedulerRunner (APScheduler) on those services."""
    from broker.scheduler.runner import SchedulerRunner

    runners: list[Any] = []

    def start(services: Any) -> Any:
        runner = SchedulerRunner(services)
        runner.start()
        runners.append(runner)
        return runner

    yield start
    for runner in runners:
        runner.stop()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """`processes(config, "serve", workers=.., threads=.., scheduler=..)` or `(config, "scheduler")`."""
    started: list[BrokerProcess] = []
    count = 0

    def launch(config: dict[str, Any], kind: str = "serve", **options: Any) -> BrokerProcess:
        nonlocal count
        count += 1
        path = tmp_path / f"broker-{count}.yaml"
        path.write_text(yaml.safe_dump(config))
        log = tmp_path / f"{kind}-{count}.log"
        if kind == "serve":
            process = BrokerProcess.serve(path, log, **options)
        else:
            process = BrokerProcess([kind], path, log)
        started.append(process)
        return process

    yield launch
    for process in reversed(started):
        process.stop()
