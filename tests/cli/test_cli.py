"""Start-up refuses what would fail later, in one line that names the problem."""

from __future__ import annotations

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
    result = CliRunner().invoke(main, ["scheduler", "--config", str(write_config(tmp_path, policy_file=str(bad)))])
    assert result.exit_code == 2
    assert result.output.startswith("policy_file: ")


def test_help_teaches_with_examples():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("serve", "scheduler", "migrate", "dev", "policy", "audit", "leases", "tasks", "approvals"):
        assert command in result.output
    assert "broker policy check" in result.output


def test_without_any_config_the_error_says_where_one_is_looked_for(monkeypatch):
    for name in ("BROKER_CONFIG", "BROKER_DATABASE_URL", "BROKER_VAULT_ADDR", "BROKER_VAULT_TOKEN", "BROKER_POLICY_FILE"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(main, ["migrate"])
    assert result.exit_code == 2
    assert "no config file given: use --config FILE or BROKER_CONFIG" in result.output


def test_a_bad_metrics_bind_is_a_usage_error_not_a_traceback(tmp_path):
    result = CliRunner().invoke(main, ["scheduler", "--config", str(write_config(tmp_path)), "--metrics-bind", "abc"])
    assert result.exit_code == 2
    assert "Invalid value for '--metrics-bind'" in result.output
    assert "Traceback" not in result.output
