"""Start-up refuses what would fail later, in one line that names the problem."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from broker.cli.main import main
from tests.conftest import DEMO_POLICY


def write_config(tmp_path, **changes):
    config = {
        "database_url": "postgresql://broker@127.0.0.1:1/broker",
        "vault": {"addr": "http://127.0.0.1:1", "auth": {"method": "token", "token": "t"}},
        "policy_file": str(DEMO_POLICY),
        "issuers": [
            {"name": "spire", "issuer": "https://spire.test", "jwks_file": str(tmp_path / "missing.json"),
             "audiences": ["credential-broker"], "kind": "spiffe", "trust_domain": "example.org", "use": "workload"}
        ],
    }  # fmt: skip
    config.update(changes)
    path = tmp_path / "broker.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_serve_refuses_an_unreadable_jwks_file(tmp_path):
    result = CliRunner().invoke(main, ["serve", "--config", str(write_config(tmp_path))])
    assert result.exit_code == 2
    assert result.output.startswith("issuers: ")


def test_scheduler_refuses_a_bad_policy_file(tmp_path):
    bad = tmp_path / "policy.yaml"
    bad.write_text("tasks:\n  x: {ttl: {default: 5, max: 1}}\n")
    result = CliRunner().invoke(
        main, ["scheduler", "--config", str(write_config(tmp_path, policy_file=str(bad)))]
    )
    assert result.exit_code == 2
    assert result.output.startswith("policy_file: ")


def test_help_teaches_with_examples():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in (
        "serve",
        "scheduler",
        "migrate",
        "dev",
        "policy",
        "audit",
        "leases",
        "tasks",
        "approvals",
    ):
        assert command in result.output
    assert "broker policy check" in result.output


def test_without_any_config_the_error_says_where_one_is_looked_for(monkeypatch):
    for name in (
        "BROKER_CONFIG",
        "BROKER_DATABASE_URL",
        "BROKER_VAULT_ADDR",
        "BROKER_VAULT_TOKEN",
        "BROKER_POLICY_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(main, ["migrate"])
    assert result.exit_code == 2
    assert "no config file given: use --config FILE or BROKER_CONFIG" in result.output


def test_a_bad_metrics_bind_is_a_usage_error_not_a_traceback(tmp_path):
    result = CliRunner().invoke(
        main, ["scheduler", "--config", str(write_config(tmp_path)), "--metrics-bind", "abc"]
    )
    assert result.exit_code == 2
    assert "Invalid value for '--metrics-bind'" in result.output
    assert "Traceback" not in result.output


def _commands(command, path=("broker",)):
    import click

    yield " ".join(path), command
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from _commands(sub, (*path, name))


def test_every_command_has_an_example_in_its_help():
    found = dict(_commands(main))
    assert {"broker serve", "broker leases kill", "broker tasks show", "broker reload"} <= set(found)
    for name, _command in found.items():
        result = CliRunner().invoke(main, [*name.split()[1:], "--help"])
        assert result.exit_code == 0, name
        assert "Example" in result.output, f"{name} --help shows no example"
        assert f"  {name} " in result.output or name == "broker", f"{name}'s example does not run it"


@pytest.mark.parametrize(
    ("group", "states"),
    [
        ("leases", ("active", "revoke_pending", "revoked")),
        ("tasks", ("pending_approval", "approval_expired")),
    ],
)
def test_state_lists_its_values_and_refuses_others(group, states):
    helped = CliRunner().invoke(main, [group, "list", "--help"])
    for state in states:
        assert state in helped.output
    refused = CliRunner().invoke(
        main, [group, "list", "--url", "http://127.0.0.1:1", "--token", "t", "--state", "actve"]
    )
    assert refused.exit_code == 2 and "Invalid value for '--state'" in refused.output


def test_reload_finds_no_broker_through_a_missing_or_foreign_pid_file(tmp_path):
    import os

    missing = CliRunner().invoke(main, ["reload", "--pid-file", str(tmp_path / "none.pid")])
    assert missing.exit_code == 1 and "no running broker serve found" in missing.output
    # A stale file naming a pid the system gave to another process: that one gets no signal.
    foreign = tmp_path / "foreign.pid"
    foreign.write_text(f"{os.getpid()}\n")
    result = CliRunner().invoke(main, ["reload", "--pid-file", str(foreign)])
    assert result.exit_code == 1


def test_reload_checks_the_policy_before_signalling(tmp_path):
    bad = tmp_path / "policy.yaml"
    bad.write_text("tasks:\n  x: {ttl: {default: 5, max: 1}}\n")
    config = write_config(tmp_path, policy_file=str(bad))
    result = CliRunner().invoke(
        main, ["reload", "--config", str(config), "--pid-file", str(tmp_path / "x.pid")]
    )
    assert result.exit_code == 2 and result.output.startswith("policy_file: ")


def test_serve_refuses_a_port_in_use_naming_it(tmp_path, monkeypatch):
    import socket

    from broker.cli import main as cli_main

    config = write_config(tmp_path)
    # Past the issuer checks (they would refuse the missing jwks_file first).
    monkeypatch.setattr(cli_main, "_check_policy", lambda _settings: None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--config", str(config), "--bind", f"127.0.0.1:{port}"])
    assert result.exit_code == 2
    assert f"127.0.0.1:{port} is already in use" in result.output
