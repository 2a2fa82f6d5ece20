"""Credentials as environment variables; and the client imports without the server's packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from broker.client.env import credential_env, render_templates, secret_values
from broker.client.sdk import approver_groups

ROOT = Path(__file__).resolve().parents[2]
CREDENTIALS = {
    "db": {"kind": "database", "data": {"username": "v-user", "password": "p@ss"}, "expires_at": "x"},
    "my-token.x": {
        "kind": "vault_token",
        "data": {"token": "hvs.1", "policies": ["a", "b"]},
        "expires_at": "x",
    },
}


def test_each_field_becomes_name_field_upper_cased():
    env = credential_env(CREDENTIALS, "task-1", "2030-01-01T00:00:00.000Z")
    assert env == {
        "DB_USERNAME": "v-user",
        "DB_PASSWORD": "p@ss",
        "MY_TOKEN_X_TOKEN": "hvs.1",
        "MY_TOKEN_X_POLICIES": '["a", "b"]',
        "BROKER_TASK_ID": "task-1",
        "BROKER_TASK_EXPIRES_AT": "2030-01-01T00:00:00.000Z",
    }


def test_one_vault_gateway_handle_also_sets_the_vault_and_bao_variables():
    handle = {"addr": "http://gw:8201", "token": "brk_1.s"}
    credential = {"kind": "vault_token", "delivery": "gateway", "data": handle, "expires_at": "x"}
    env = credential_env({"vault": credential}, "task-1", "x")
    assert (env["VAULT_ADDR"], env["VAULT_TOKEN"]) == ("http://gw:8201", "brk_1.s")
    assert (env["BAO_ADDR"], env["BAO_TOKEN"]) == ("http://gw:8201", "brk_1.s")
    two = credential_env({"a": credential, "b": credential}, "task-1", "x")
    assert "VAULT_TOKEN" not in two and two["A_TOKEN"] == "brk_1.s"  # which one: a guess, so neither
    direct = credential_env(CREDENTIALS, "task-1", "x")
    assert "VAULT_TOKEN" not in direct


def test_two_fields_on_one_name_are_an_error():
    clash = {"a-b": {"data": {"c": "1"}}, "a": {"data": {"b-c": "2"}}}
    with pytest.raises(ValueError, match=r"A_B_C"):
        credential_env(clash, "t", "e")


def test_templates():
    env = {"DB_USERNAME": "user-xyz", "DB_PASSWORD": "secret-xyz"}
    rendered = render_templates(["URL=postgresql://{DB_USERNAME}:{DB_PASSWORD}@h/db", 'J={{"a": 1}}'], env)
    assert rendered == {"URL": "postgresql://user-xyz:secret-xyz@h/db", "J": '{"a": 1}'}
    with pytest.raises(ValueError, match=r"\{DB_PASS\}") as unknown:
        render_templates(["URL={DB_PASSWORD}{DB_PASS}"], env)
    assert "secret-xyz" not in str(unknown.value)
    with pytest.raises(ValueError, match="NAME=TEMPLATE"):
        render_templates(["no equals sign"], env)


def test_secret_values_are_every_string_in_data():
    assert secret_values(CREDENTIALS) == {"v-user", "p@ss", "hvs.1", "a", "b"}


def test_approver_groups_when_the_task_names_them():
    assert approver_groups({"approval": {"approvers": {"groups": ["dba"]}}}) == ["dba"]
    assert approver_groups({"approval": {"state": "pending"}}) == []


BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"flask", "sqlalchemy", "gunicorn", "psycopg"}:
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
"""


def test_the_client_imports_without_the_servers_packages():
    code = BLOCKER + (
        "import broker.client, broker.client.tokens, broker.client.env, broker.client.exec, broker.client.cli\n"
        "import runpy; sys.argv = ['broker exec', '--help']\n"
        "runpy.run_module('broker.client.cli', run_name='__main__')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "--token-source" in done.stdout
