"""Configure a dev/test OpenBao the way the broker expects a real one to be configured.

`configure_vault` is idempotent (run it again and nothing breaks or duplicates, except
that it mints a fresh broker token). It mirrors `vault-config/setup.sh`, the operator
script for real servers: keep the two in step.

What it sets up:
- `database/` engine with a connection to the target Postgres and two roles,
  `analytics-ro` (SELECT on schema `analytics`) and `app-rw`, each with an explicit
  max_ttl, `VALID UNTIL` on the password, and revocation that kills open sessions;
- `pki/` with a root CA and role `agents` (`*.agents.example.org`, max 1 h,
  `generate_lease` so each certificate has a lease the task token owns);
- kv v2 `secret/` holding `secret/reports/q3`, and ACL policy `reports-read` for it;
- token role `broker-task` for per-task tokens (orphan, non-renewable, max 1 h);
- ACL policy `broker` (least privilege, no sudo) and a periodic broker token with it;
- optionally a `jwt/` auth method for agents that log in to OpenBao themselves.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.config import VaultAuth, VaultSettings
from broker.vault.hvac_client import HvacVault

ANALYTICS_SCHEMA = "analytics"
REPORTS_POLICY = "reports-read"
PEER_POLICY = "peer-analytics"
PKI_DOMAIN = "agents.example.org"
TASK_TOKEN_ROLE = "broker-task"  # noqa: S105 (a role name, not a secret)
POLICY_PREFIX = "broker-task-"
BROKER_POLICY = "broker"
BROKER_TOKEN_PERIOD = "24h"  # noqa: S105 (a duration)
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class PostgresTarget:
    """Where the database engine connects. `host` is a socket directory or an IP."""

    host: str
    port: int
    superuser: str
    password: str | None = field(default=None, repr=False)
    dbname: str = "analytics"

    @property
    def is_socket(self) -> bool:
        return self.host.startswith("/")


@dataclass(frozen=True)
class VaultSetup:
    addr: str
    broker_token: str = field(repr=False)
    broker_token_accessor: str
    broker_policy: str
    task_token_role: str
    policy_prefix: str
    database_mount: str
    database_connection: str
    database_roles: tuple[str, ...]
    database_name: str
    pki_mount: str
    pki_role: str
    pki_domain: str
    kv_mount: str
    reports_policy: str
    reports_path: str
    jwt_mount: str | None = None
    jwt_role: str | None = None
    peer_policy: str | None = None

    def vault_settings(self, **overrides: Any) -> VaultSettings:
        """Settings that run the broker with the least-privilege broker token."""
        values: dict[str, Any] = {
            "addr": self.addr,
            "auth": VaultAuth(method="token", token=self.broker_token),
            "task_token_role": self.task_token_role,
            "policy_prefix": self.policy_prefix,
        }
        values.update(overrides)
        return VaultSettings(**values)


# -- policies --------------------------------------------------------------------------


def render_broker_policy(task_token_role: str = TASK_TOKEN_ROLE, policy_prefix: str = POLICY_PREFIX) -> str:
    """The broker's own ACL policy: exactly what VaultGateway calls, and no sudo."""
    return f"""\
# ACL policy for the credential broker's own token. Nothing here needs sudo.

# Mint per-task tokens, only through the task token role (orphan, non-renewable,
# TTL-capped; the role's allowed_policies bound what a task token can carry).
path "auth/token/create/{task_token_role}" {{
  capabilities = ["update"]
}}

# Revoke per-task tokens and vault_token children by accessor; check if one is alive.
path "auth/token/revoke-accessor" {{
  capabilities = ["update"]
}}
path "auth/token/lookup-accessor" {{
  capabilities = ["update"]
}}

# Its own token: look up (renewable?) and renew (periodic token).
path "auth/token/lookup-self" {{
  capabilities = ["read"]
}}
path "auth/token/renew-self" {{
  capabilities = ["update"]
}}

# Revoke one lease synchronously, then confirm it is gone.
path "sys/leases/revoke" {{
  capabilities = ["update"]
}}
path "sys/leases/lookup" {{
  capabilities = ["update"]
}}

# Give a lease the task's TTL instead of its role's default (one renew with `increment`).
path "sys/leases/renew" {{
  capabilities = ["update"]
}}

# Write the generated per-task-type ACL policies, and only those.
path "sys/policies/acl/{policy_prefix}*" {{
  capabilities = ["create", "update"]
}}

# Not granted: listing leases (sys/leases/lookup/<prefix>/ with LIST) needs sudo. The
# broker does not need it: a crash leaves leases tied to a recorded task token, which
# revoke-accessor cleans up. Grant it only if you run an orphan sweep by listing:
# path "sys/leases/lookup/database/creds/*" {{
#   capabilities = ["list", "sudo"]
# }}
"""


def render_reports_policy(kv_mount: str = "secret") -> str:
    return f'path "{kv_mount}/data/reports/*" {{\n  capabilities = ["read"]\n}}\n'


def render_peer_policy(database_mount: str, pki_mount: str) -> str:
    """What an agent logging in with its own JWT (the benchmark's direct flow) may read."""
    return (
        f'path "{database_mount}/creds/analytics-ro" {{\n  capabilities = ["read"]\n}}\n'
        f'path "{pki_mount}/issue/agents" {{\n  capabilities = ["update"]\n}}\n'
    )


# -- database ----------------------------------------------------------------------------


def database_connection_config(target: PostgresTarget, allowed_roles: Sequence[str]) -> dict[str, Any]:
    """Body for `database/config/<name>`; the URL keeps `{{username}}`/`{{password}}`
    templates so the password is stored once, in its own (write-only) field."""
    _identifier(target.dbname)
    auth = "{{username}}:{{password}}@" if target.password is not None else f"{target.superuser}@"
    if target.is_socket:
        url = f"postgresql://{auth}/{target.dbname}?host={target.host}&port={target.port}"
    else:
        url = f"postgresql://{auth}{target.host}:{target.port}/{target.dbname}?sslmode=disable"
    body: dict[str, Any] = {
        "plugin_name": "postgresql-database-plugin",
        "connection_url": url,
        "allowed_roles": list(allowed_roles),
        "verify_connection": True,
        # The default of 4 connections serialises revocations (DROP ROLE) in an expiry
        # storm; the scheduler revokes with up to `revoke_workers` threads per replica.
        "max_open_connections": 16,
        "max_idle_connections": 8,
    }
    if target.password is not None:
        body["username"] = target.superuser
        body["password"] = target.password
    return body


# Vault templates use {{name}}/{{password}}/{{expiration}}; <schema> and <db> are ours.
# A dynamic user gets its privileges by joining a group role made once with the database
# (`prepare_database`), not by grants of its own: a grant per user rewrites the table's
# ACL, which grows with every live user, so creating and dropping users got slower the
# more there were (revoke 1.0 -> 3.2 ms of Postgres CPU with 1,000 live users).
_CREATE = """CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}'"""
READER_GROUP = "analytics_reader"
WRITER_GROUP = "analytics_writer"
# Idempotent (Vault retries a failed revocation) and session-killing: VALID UNTIL stops
# new logins but not sessions already open (vault#10681), so: terminate the role's
# backends (waiting up to 5 s for each), then drop. A member of a group holds no grants
# of its own; a user made by older creation statements (one grant per user) has them
# revoked first, which DROP ROLE needs. Checking first matters: a REVOKE rewrites the
# catalog row of every table in the schema even when there is nothing to revoke.
# Revocations run one at a time per connection config in Vault's plugin, so each
# statement here is on the expiry storm's critical path: `pg_stat_get_activity` by oid,
# not the `pg_stat_activity` view, which Postgres plans anew for every unprepared
# statement (its joins cost ~0.4 ms of the ~1 ms a revocation took); and no `ALTER ROLE
# NOLOGIN`, which others can't see before this one transaction commits, and then the
# role is gone anyway. (bench/PROFILE.md, item 8.)
# Vault runs a statement containing $$ as one unit instead of splitting it at each ';'.
_REVOKE = """DO $$
DECLARE
  user_oid oid := (SELECT oid FROM pg_roles WHERE rolname = '{{name}}');
BEGIN
  IF user_oid IS NOT NULL THEN
    PERFORM pg_terminate_backend(pid, 5000) FROM pg_stat_get_activity(NULL) WHERE usesysid = user_oid;
    IF EXISTS (SELECT 1 FROM pg_shdepend WHERE refobjid = user_oid AND deptype = 'a') THEN
      REVOKE ALL ON ALL TABLES IN SCHEMA <schema> FROM "{{name}}";
      REVOKE ALL ON ALL SEQUENCES IN SCHEMA <schema> FROM "{{name}}";
      REVOKE USAGE ON SCHEMA <schema> FROM "{{name}}";
      REVOKE CONNECT ON DATABASE "<db>" FROM "{{name}}";
    END IF;
    DROP ROLE "{{name}}";
  END IF;
END
$$;"""


def database_roles(dbname: str, connection: str) -> dict[str, dict[str, Any]]:
    """Bodies for `database/roles/<name>`, each with an explicit max_ttl (V12)."""
    revoke = _REVOKE.replace("<schema>", ANALYTICS_SCHEMA).replace("<db>", _identifier(dbname))
    common = {"db_name": connection, "default_ttl": 300, "max_ttl": 900, "revocation_statements": [revoke]}
    return {
        "analytics-ro": {**common, "creation_statements": [f"{_CREATE} IN ROLE {READER_GROUP};"]},
        "app-rw": {**common, "creation_statements": [f"{_CREATE} IN ROLE {WRITER_GROUP};"]},
    }


def prepare_database(target: PostgresTarget) -> None:
    """Create the target database, the `analytics` schema with a table to read, and the
    group roles the dynamic users join (as `vault-config/postgres-init.sql` does)."""
    from psycopg import sql

    _identifier(target.dbname)
    with _connect(target, "postgres") as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (target.dbname,)).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target.dbname)))
    with _connect(target, target.dbname) as conn, conn.transaction():
        # Only roles granted CONNECT (the engine's dynamic users) may log in here.
        conn.execute(
            sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(sql.Identifier(target.dbname))
        )
        schema = sql.Identifier(ANALYTICS_SCHEMA)
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.events (id bigserial PRIMARY KEY,"
                " name text NOT NULL, at timestamptz NOT NULL DEFAULT now())"
            ).format(schema)
        )
        _grant_groups(conn, target.dbname)
        count = conn.execute(sql.SQL("SELECT count(*) FROM {}.events").format(schema)).fetchone()
        if count == (0,):
            conn.execute(
                sql.SQL("INSERT INTO {}.events (name) VALUES ('signup'), ('login'), ('purchase')").format(
                    schema
                )
            )


def _grant_groups(conn: Any, dbname: str) -> None:
    """The group roles the dynamic users join: the reader may SELECT, the writer may also
    change rows; neither may log in, and tables made later in the schema are theirs too."""
    from psycopg import sql

    database, schema = sql.Identifier(dbname), sql.Identifier(ANALYTICS_SCHEMA)
    privileges = {READER_GROUP: "SELECT", WRITER_GROUP: "SELECT, INSERT, UPDATE, DELETE"}
    for group, rights in privileges.items():
        role = sql.Identifier(group)
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (group,)).fetchone():
            conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(role))
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(database, role))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, role))
        conn.execute(sql.SQL(f"GRANT {rights} ON ALL TABLES IN SCHEMA {{}} TO {{}}").format(schema, role))
        conn.execute(
            sql.SQL(f"ALTER DEFAULT PRIVILEGES IN SCHEMA {{}} GRANT {rights} ON TABLES TO {{}}").format(
                schema, role
            )
        )
    writer = sql.Identifier(WRITER_GROUP)
    conn.execute(sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA {} TO {}").format(schema, writer))
    conn.execute(
        sql.SQL("ALTER DEFAULT PRIVILEGES IN SCHEMA {} GRANT USAGE ON SEQUENCES TO {}").format(schema, writer)
    )


def _connect(target: PostgresTarget, dbname: str) -> Any:
    import psycopg

    return psycopg.connect(
        host=target.host,
        port=target.port,
        user=target.superuser,
        password=target.password,
        dbname=dbname,
        autocommit=True,
        connect_timeout=10,
    )


def _identifier(name: str) -> str:
    if not _IDENTIFIER.match(name):
        raise ValueError(f"{name!r} is not a plain lower-case SQL identifier")
    return name


# -- OpenBao -----------------------------------------------------------------------------


def configure_vault(
    addr: str,
    root_token: str,
    *,
    postgres: PostgresTarget,
    task_token_role: str = TASK_TOKEN_ROLE,
    policy_prefix: str = POLICY_PREFIX,
    broker_policy: str = BROKER_POLICY,
    broker_token_period: str = BROKER_TOKEN_PERIOD,
    database_mount: str = "database",
    database_connection: str = "analytics",
    pki_mount: str = "pki",
    kv_mount: str = "secret",
    child_token_policies: Sequence[str] = (REPORTS_POLICY,),
    jwt_jwks_pem_keys: Sequence[str] | None = None,
    jwt_bound_issuer: str | None = None,
    jwt_role: str = "agent",
    jwt_audiences: Sequence[str] = ("openbao",),
    timeout: float = 15.0,
) -> VaultSetup:
    """Idempotently configure OpenBao for the broker; returns names and a broker token."""
    prepare_database(postgres)
    # Root-token calls, once per run, so through hvac; its errors carry no bodies.
    with HvacVault(addr, timeout=timeout, token=root_token) as admin:
        roles = _setup_database(admin, postgres, database_mount, database_connection)
        _setup_pki(admin, pki_mount)
        with admin.calling("setup kv") as client:
            _mount(client, kv_mount, "kv", options={"version": "2"})
            secret = {"quarter": "q3", "revenue": "4200000"}
            client.secrets.kv.v2.create_or_update_secret("reports/q3", secret, mount_point=kv_mount)
            client.sys.create_or_update_acl_policy(REPORTS_POLICY, render_reports_policy(kv_mount))
        with admin.calling("setup broker token") as client:
            child_policies = list(child_token_policies)
            _setup_task_token_role(client, task_token_role, policy_prefix, child_policies, broker_policy)
            policy = render_broker_policy(task_token_role, policy_prefix)
            client.sys.create_or_update_acl_policy(broker_policy, policy)
            token, accessor = _create_broker_token(client, broker_policy, broker_token_period)
        pem_keys = list(jwt_jwks_pem_keys or ())
        if pem_keys:
            with admin.calling("setup jwt") as client:
                peer = render_peer_policy(database_mount, pki_mount)
                client.sys.create_or_update_acl_policy(PEER_POLICY, peer)
                _setup_jwt(client, pem_keys, jwt_bound_issuer, jwt_role, jwt_audiences)
    return VaultSetup(
        addr=addr.rstrip("/"),
        broker_token=token,
        broker_token_accessor=accessor,
        broker_policy=broker_policy,
        task_token_role=task_token_role,
        policy_prefix=policy_prefix,
        database_mount=database_mount,
        database_connection=database_connection,
        database_roles=roles,
        database_name=postgres.dbname,
        pki_mount=pki_mount,
        pki_role="agents",
        pki_domain=PKI_DOMAIN,
        kv_mount=kv_mount,
        reports_policy=REPORTS_POLICY,
        reports_path=f"{kv_mount}/data/reports/q3",
        jwt_mount="jwt" if pem_keys else None,
        jwt_role=jwt_role if pem_keys else None,
        peer_policy=PEER_POLICY if pem_keys else None,
    )


def _mount(client: Any, path: str, kind: str, **options: Any) -> None:
    if f"{path}/" not in (client.sys.list_mounted_secrets_engines().get("data") or {}):
        client.sys.enable_secrets_engine(kind, path=path, **options)


def _setup_database(admin: HvacVault, target: PostgresTarget, mount: str, connection: str) -> tuple[str, ...]:
    roles = database_roles(target.dbname, connection)
    with admin.calling("setup database") as client:
        _mount(client, mount, "database")
        config = database_connection_config(target, list(roles))
        client.secrets.database.configure(connection, mount_point=mount, **config)
        for name, body in roles.items():
            client.secrets.database.create_role(name, mount_point=mount, **body)
    return tuple(roles)


# The role certificates are issued through.
_PKI_ROLE = {
    "allowed_domains": [PKI_DOMAIN],
    "allow_subdomains": True,
    "allow_bare_domains": False,
    "allow_localhost": False,
    "allow_ip_sans": False,
    "max_ttl": "1h",
    # A lease per certificate, owned by the task token: revoking the token or the
    # lease revokes the certificate (V17). Fine at dev scale; see README.
    "generate_lease": True,
    # EC keys: generated in microseconds, where RSA-2048 costs tens of ms per start.
    "key_type": "ec",
    "key_bits": 256,
}


def _setup_pki(admin: HvacVault, mount: str) -> None:
    with admin.calling("setup pki") as client:
        _mount(client, mount, "pki", config={"max_lease_ttl": "87600h"})
        # An empty answer (204) until a root CA exists.
        if not client.secrets.pki.read_ca_certificate(mount_point=mount).strip():
            root = {"ttl": "87600h", "key_type": "ec"}
            common_name = "Credential Broker Dev Root CA"
            client.secrets.pki.generate_root("internal", common_name, extra_params=root, mount_point=mount)
        client.secrets.pki.create_or_update_role("agents", extra_params=dict(_PKI_ROLE), mount_point=mount)


def _setup_task_token_role(
    client: Any, role: str, policy_prefix: str, child_policies: Sequence[str], broker_policy: str
) -> None:
    # A plain write: hvac's `auth.token.create_or_update_role` has no
    # `allowed_policies_glob` or `token_type`, and both matter here.
    body = {
        # Task-type policies the broker writes, plus every policy a vault_token
        # credential may hand out. Nothing else, whatever the broker asks for.
        "allowed_policies_glob": [f"{policy_prefix}*"],
        "allowed_policies": list(child_policies),
        "disallowed_policies": [broker_policy, "root"],
        # Orphan: the broker's own token expiring must not take task credentials
        # with it, and a task's credentials must not outlive its token.
        "orphan": True,
        "renewable": False,
        "token_type": "service",  # batch tokens can't be revoked by accessor
        "token_explicit_max_ttl": 3600,
    }
    client.adapter.post(f"/v1/auth/token/roles/{role}", json=body)


def _create_broker_token(client: Any, policy: str, period: str) -> tuple[str, str]:
    # no_parent (an orphan, which root may create): revoking the root token that made it
    # must not take the broker's token along.
    reply = client.auth.token.create(
        policies=[policy],
        no_parent=True,
        no_default_policy=True,
        period=period,
        renewable=True,
        display_name="credential-broker",
    )
    auth = reply["auth"]
    return str(auth["client_token"]), str(auth["accessor"])


def _setup_jwt(
    client: Any, pem_keys: Sequence[str], bound_issuer: str | None, role: str, audiences: Sequence[str]
) -> None:
    if "jwt/" not in (client.sys.list_auth_methods().get("data") or {}):
        client.sys.enable_auth_method("jwt", path="jwt")
    client.auth.jwt.configure(jwt_validation_pubkeys=list(pem_keys), bound_issuer=bound_issuer or None)
    client.auth.jwt.create_role(
        role,
        user_claim="sub",
        allowed_redirect_uris=None,
        role_type="jwt",
        bound_audiences=list(audiences),
        token_policies=[PEER_POLICY],
        token_ttl=900,
        token_max_ttl=900,
        token_no_default_policy=True,
    )


def jwks_to_pem(jwks: Mapping[str, Any]) -> list[str]:
    """PEM public keys from a JWKS document, for `jwt_jwks_pem_keys`."""
    import jwt
    from cryptography.hazmat.primitives import serialization

    pems = []
    for key in jwt.PyJWKSet.from_dict(dict(jwks)).keys:
        public = key.key.public_key() if hasattr(key.key, "private_bytes") else key.key
        pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        pems.append(pem.decode())
    return pems
