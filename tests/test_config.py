from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.config import ConfigError, load_settings, settings_from_mapping

BASE: dict[str, Any] = {
    "database_url": "postgresql://broker@127.0.0.1:5432/broker",
    "vault": {"addr": "http://127.0.0.1:8200", "auth": {"method": "token", "token": "t"}},
    "policy_file": "/etc/broker/policy.yaml",
    "issuers": [
        {
            "name": "spire",
            "issuer": "https://spire.example.org",
            "jwks_file": "/k.json",
            "audiences": ["credential-broker"],
            "kind": "spiffe",
            "trust_domain": "example.org",
            "use": "workload",
        }
    ],
}


def with_changes(**changes):
    config = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in changes.items():
        node = config
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[key] if not key.isdigit() else node[int(key)]
        if value is ...:
            del node[last]
        else:
            node[last] = value
    return config


def test_a_good_config_loads_with_defaults():
    settings = settings_from_mapping(BASE, env={})
    assert settings.limits.max_body_bytes == 65536
    assert settings.issuers[0].use == ["workload"]
    assert settings.sqlalchemy_url.startswith("postgresql+psycopg://")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"database_url": ...}, "config: missing required key 'database_url'"),
        ({"databse_url": "x"}, "config: unknown key 'databse_url' (check its spelling)"),
        ({"database_url": "mysql://x"}, "config: bad value for 'database_url': must be a postgresql:// URL"),
        ({"vault__auth__token": ...}, "config: bad value for 'vault.auth': method 'token' needs 'token'"),
        ({"vault__auth__method": "ldap"}, "config: bad value for 'vault.auth.method'"),
        ({"issuers__0__singel_use": True}, "config: unknown key 'issuers.0.singel_use' (check its spelling)"),
        ({"issuers__0__trust_domain": ...}, "kind 'spiffe' needs 'trust_domain'"),
        ({"issuers__0__algorithms": ["HS256"]}, "only asymmetric algorithms are allowed"),
        ({"issuers__0__jwks_uri": "https://x"}, "exactly one of 'jwks_file' or 'jwks_uri'"),
        ({"limits": {"max_body_bytes": 0}}, "config: bad value for 'limits.max_body_bytes'"),
        (
            {"vault__addr": "vault.internal:8200"},
            "config: bad value for 'vault.addr': must be an http:// or https://",
        ),
        ({"vault__addr": ""}, "config: bad value for 'vault.addr'"),
        ({"vault__addr": "https://"}, "config: bad value for 'vault.addr'"),
        ({"issuers__0__use": []}, "config: bad value for 'issuers.0.use'"),
    ],
    ids=lambda value: str(value)[:40],
)
def test_a_bad_config_names_the_key_in_one_line(changes, message):
    with pytest.raises(ConfigError) as raised:
        settings_from_mapping(with_changes(**changes), env={})
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_environment_overrides_single_keys():
    env = {
        "BROKER_DATABASE_URL": "postgresql://other/db",
        "BROKER_VAULT_ADDR": "http://vault:8200",
        "BROKER_VAULT_TOKEN": "from-env",
        "BROKER_POLICY_FILE": "/p.yaml",
    }
    settings = settings_from_mapping(BASE, env=env)
    assert settings.database_url == "postgresql://other/db"
    assert settings.vault.addr == "http://vault:8200"
    assert settings.vault.auth.token == "from-env"
    assert settings.policy_file == Path("/p.yaml")


def test_env_completes_a_config_that_lacks_keys():
    partial = {k: v for k, v in BASE.items() if k != "database_url"}
    settings = settings_from_mapping(partial, env={"BROKER_DATABASE_URL": "postgresql://h/db"})
    assert settings.database_url == "postgresql://h/db"


def test_file_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("vault: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_settings(bad, env={})


def test_the_config_file_comes_from_broker_config(tmp_path):
    path = tmp_path / "broker.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert load_settings(env={"BROKER_CONFIG": str(path)}).vault.addr == "http://127.0.0.1:8200"


def test_broker_migrate_with_a_typo_exits_nonzero_with_one_line(tmp_path):
    from click.testing import CliRunner

    from broker.cli.main import main

    path = tmp_path / "broker.yaml"
    path.write_text(yaml.safe_dump(with_changes(databse_url="x")))
    result = CliRunner().invoke(main, ["migrate", "--config", str(path)])
    assert result.exit_code == 2
    assert result.output.strip() == "config: unknown key 'databse_url' (check its spelling)"


# ---- strict types: a quoted value is a typo, not a number (docs/configuration.md) ----------

# Every optional section present, so the walk below reaches each of their keys.
FULL = {
    **BASE,
    "notify": {"webhook_url": "https://hooks.example.org/x", "secret_env": "HOOK_KEY"},
    "issuers": [{**BASE["issuers"][0], "max_token_lifetime_seconds": 3600}],
}


def _scalar_fields(model, prefix=()):
    """(dotted path, the field's type) for every int, float, bool or str key, recursively."""
    import types
    import typing

    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        annotation = field.annotation
        union = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
        options = [option for option in union if option is not type(None)]
        inner = typing.get_args(options[0]) if typing.get_origin(options[0]) is list else ()
        if inner and isinstance(inner[0], type) and issubclass(inner[0], BaseModel):
            yield from _scalar_fields(inner[0], (*prefix, name, 0))
        elif isinstance(options[0], type) and issubclass(options[0], BaseModel):
            yield from _scalar_fields(options[0], (*prefix, name))
        elif options[0] in (int, float, bool, str):
            yield (*prefix, name), options[0]


def _set(config, path, value):
    node = config
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
    node[path[-1]] = value


def test_the_full_config_used_below_is_valid():
    settings = settings_from_mapping(FULL, env={})
    assert settings.notify is not None and settings.issuers[0].max_token_lifetime_seconds == 3600


def _wrong_types():
    from broker.config import Settings

    found = list(_scalar_fields(Settings))
    assert len(found) > 30  # the walk reached the nested sections
    wrong_values: dict[type, list[object]] = {
        int: ["5"],
        float: ["5", "5.0"],
        bool: ["yes", "true"],
        str: [5, True],
    }
    for path, kind in found:
        wrong = wrong_values[kind]
        for value in wrong:
            yield pytest.param(path, value, id=f"{'.'.join(map(str, path))}={value!r}")


@pytest.mark.parametrize(("path", "value"), list(_wrong_types()))
def test_every_scalar_key_refuses_a_value_of_the_wrong_type(path, value):
    config = yaml.safe_load(yaml.safe_dump(FULL))
    _set(config, path, value)
    with pytest.raises(ConfigError) as raised:
        settings_from_mapping(config, env={})
    assert f"config: bad value for '{'.'.join(map(str, path))}'" in str(raised.value)


def test_environment_overrides_are_strings_and_still_apply():
    # The overrides are strings by nature, and every one of them sets a string key (or a
    # path), so strict types take them as they are.
    settings = settings_from_mapping(BASE, env={"BROKER_POLICY_FILE": "/p.yaml", "BROKER_VAULT_TOKEN": "t2"})
    assert settings.policy_file == Path("/p.yaml") and settings.vault.auth.token == "t2"


# ---- secrets: read from the environment once, never from the file, never shown ----------


def test_secrets_come_from_the_variables_their_env_keys_name():
    settings = settings_from_mapping(
        {**FULL, "audit": {"key_env": "MY_AUDIT_KEY"}}, env={"MY_AUDIT_KEY": "audit-k", "HOOK_KEY": "hook-k"}
    )
    assert settings.audit.key is not None and settings.audit.key.get_secret_value() == b"audit-k"
    assert settings.notify is not None and settings.notify.secret is not None
    assert settings.notify.secret.get_secret_value() == b"hook-k"


@pytest.mark.parametrize("env", [{}, {"BROKER_AUDIT_KEY": "", "HOOK_KEY": ""}], ids=["unset", "empty"])
def test_an_unset_or_empty_secret_is_none(env):
    settings = settings_from_mapping(FULL, env=env)
    assert settings.audit.key is None and settings.notify is not None and settings.notify.secret is None


def test_no_repr_str_or_dump_of_the_settings_shows_a_secret():
    settings = settings_from_mapping(FULL, env={"BROKER_AUDIT_KEY": "audit-k-123", "HOOK_KEY": "hook-k-456"})
    for shown in (repr(settings), str(settings), str(settings.model_dump()), settings.model_dump_json()):
        assert "audit-k-123" not in shown and "hook-k-456" not in shown


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"audit": {"key": "in-the-file"}}, "audit.key"),
        ({"notify": {**FULL["notify"], "secret": "x"}}, "notify.secret"),
    ],
)
def test_a_secret_written_in_the_file_is_an_unknown_key(changes, key):
    with pytest.raises(ConfigError) as raised:
        settings_from_mapping({**FULL, **changes}, env={})
    assert str(raised.value) == f"config: unknown key '{key}' (check its spelling)"
    assert "in-the-file" not in str(raised.value)
