"""Credentials as environment variables, for `broker exec` and the GitHub Action.

Credential `db` with `{"username": ..., "password": ...}` becomes `DB_USERNAME` and
`DB_PASSWORD`: `<NAME>_<FIELD>` upper-cased, every character outside A-Z and 0-9 turned
into `_`. Values that are not strings (a PKI `ca_chain` list, a token's `policies`) are
JSON-encoded. The GitHub Action (deploy/github-action/main.js) follows the same rules.

A task with exactly one gateway database credential (docs/gateway.md) also gets libpq's
own variables for its handle (`PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGDATABASE`,
`PGSSLMODE`), so `psql` and every libpq client connect through the gateway unasked.
Likewise a task with exactly one gateway `vault_token` credential gets `VAULT_ADDR`,
`VAULT_TOKEN`, `BAO_ADDR` and `BAO_TOKEN` for its handle, so the `vault` and `bao` CLIs
(and hvac, which reads `VAULT_ADDR`/`VAULT_TOKEN`) go through the gateway's Vault API.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

TASK_ID_VAR = "BROKER_TASK_ID"
EXPIRES_AT_VAR = "BROKER_TASK_EXPIRES_AT"
_NOT_ALNUM = re.compile(r"[^A-Z0-9]")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# `{NAME}` is a variable, `{{` and `}}` are literal braces.
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


def env_name(*parts: str) -> str:
    """`env_name("db", "user-name")` == "DB_USER_NAME"."""
    return _NOT_ALNUM.sub("_", "_".join(parts).upper())


def credential_env(credentials: Mapping[str, Any], task_id: str, expires_at: str) -> dict[str, str]:
    """The variables for a task's `credentials` (as the broker answers them), plus its id and deadline.

    Two fields that map to the same variable (`a-b.c` and `a.b-c`) are an error rather
    than one silently hiding the other.
    """
    env: dict[str, str] = {}
    origin: dict[str, str] = {}
    for name, credential in credentials.items():
        data = credential["data"] if isinstance(credential, Mapping) else credential.data
        for field, value in data.items():
            var = env_name(name, field)
            if var in env or var in (TASK_ID_VAR, EXPIRES_AT_VAR):
                first = origin.get(var, var)
                raise ValueError(f"credential fields {first} and {name}.{field} both become ${var}")
            env[var] = value if isinstance(value, str) else json.dumps(value)
            origin[var] = f"{name}.{field}"
    env[TASK_ID_VAR] = task_id
    env[EXPIRES_AT_VAR] = expires_at
    handles = [_data(item) for item in credentials.values() if _is_gateway_database(item)]
    if len(handles) == 1:  # with two, which one PGHOST names would be a guess
        env.update({var: str(handles[0][field]) for var, field in LIBPQ_VARS.items() if field in handles[0]})
    vault_handles = [_data(item) for item in credentials.values() if _is_gateway_kind(item, "vault_token")]
    if len(vault_handles) == 1:
        env.update(
            {
                var: str(vault_handles[0][field])
                for var, field in VAULT_VARS.items()
                if field in vault_handles[0]
            }
        )
    return env


# libpq's variables, and the handle field each takes.
LIBPQ_VARS = {
    "PGHOST": "host",
    "PGPORT": "port",
    "PGUSER": "username",
    "PGPASSWORD": "password",
    "PGDATABASE": "dbname",
    "PGSSLMODE": "sslmode",
}


# The Vault and OpenBao clients' variables, and the Vault handle field each takes.
VAULT_VARS = {"VAULT_ADDR": "addr", "VAULT_TOKEN": "token", "BAO_ADDR": "addr", "BAO_TOKEN": "token"}


def _is_gateway_kind(credential: Any, kind: str) -> bool:
    if isinstance(credential, Mapping):
        return credential.get("delivery") == "gateway" and credential.get("kind") == kind
    return getattr(credential, "delivery", None) == "gateway" and getattr(credential, "kind", None) == kind


def _data(credential: Any) -> Mapping[str, Any]:
    data: Mapping[str, Any] = credential["data"] if isinstance(credential, Mapping) else credential.data
    return data


def _is_gateway_database(credential: Any) -> bool:
    if isinstance(credential, Mapping):
        return credential.get("delivery") == "gateway" and credential.get("kind") == "database"
    return (
        getattr(credential, "delivery", None) == "gateway" and getattr(credential, "kind", None) == "database"
    )


def render_templates(templates: Iterable[str], env: Mapping[str, str]) -> dict[str, str]:
    """`["DATABASE_URL=postgresql://{DB_USERNAME}:{DB_PASSWORD}@host/db"]` -> {"DATABASE_URL": "..."}.

    Each template is `NAME=TEMPLATE`; `{VAR}` is replaced by `env[VAR]` (the credential
    variables, or any variable of the caller's environment that was passed in), `{{` and
    `}}` are literal braces. An unknown `{VAR}` is an error naming it, never left in place.
    """
    rendered: dict[str, str] = {}
    for template in templates:
        name, sep, text = template.partition("=")
        if not sep or not _NAME.match(name):
            raise ValueError(f"--env wants NAME=TEMPLATE, got a bad NAME in {name[:40]!r}")

        def substitute(match: re.Match[str], name: str = name) -> str:
            if match.group(0) == "{{":
                return "{"
            if match.group(0) == "}}":
                return "}"
            var = match.group(1)
            if var not in env:
                raise ValueError(f"--env {name}: no variable {{{var}}} to put in it")
            return env[var]

        rendered[name] = _PLACEHOLDER.sub(substitute, text)
    return rendered


def secret_values(credentials: Mapping[str, Any]) -> set[str]:
    """Every non-empty string inside the credentials' `data`, for masking and redaction."""
    found: set[str] = set()
    for credential in credentials.values():
        data = credential["data"] if isinstance(credential, Mapping) else credential.data
        found.update(_strings(data))
    return found


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        if value:
            yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)
