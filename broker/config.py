"""Typed settings: one YAML file plus a few environment overrides (docs/contract.md §2).

Every key is validated at start-up; an unknown or bad key stops the process with a
one-line message naming it, because a silently ignored typo in a security service
(say `single_use` spelt `singel_use`) is a hole nobody sees.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretBytes,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

IdentityUse = Literal["workload", "approver", "operator"]

# Asymmetric algorithms only: `none` and HMAC are refused whatever the config says (docs/contract.md §3).
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
# JWT-SVIDs are RS/ES/PS only (SPIFFE JWT-SVID §2.1).
SPIFFE_ALGORITHMS = ASYMMETRIC_ALGORITHMS - {"EdDSA"}


_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")

# An OIDC workload id is `<issuer name>:<sub>` and a SPIFFE one is the bare SPIFFE ID, so
# the name is what keeps ids of different issuers apart (broker/identity/ids.py has the
# proof). No `:` (the id's first `:` ends the name), lowercase only (approvals compare ids
# case-insensitively, so `Corp` and `corp` would meet there), no `.`, `+` or `_` (nothing
# a URI scheme may hold that a name could be confused with).
ISSUER_NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
# Names that would make `<name>:<sub>` read as (or be) a URI: `spiffe` would give the very
# ids a SPIFFE issuer gives; the others would look like URLs or URNs in audit rows, globs
# and certificate names.
RESERVED_ISSUER_NAMES = frozenset(
    {"spiffe", "http", "https", "urn", "uri", "url", "did", "file", "mailto", "data"}
)


def _trusted_url(uri: str) -> bool:
    parsed = urlsplit(uri)
    if parsed.scheme == "https":
        return bool(parsed.hostname)
    return parsed.scheme == "http" and parsed.hostname in {"127.0.0.1", "localhost", "::1"}


class ConfigError(Exception):
    """A configuration problem, worded as one line that names the key."""


class _Strict(BaseModel):
    # strict: YAML has real numbers and booleans, so a quoted `"5"` or `"yes"` is a typo
    # or a template gone wrong, and coercing it would hide which (docs/configuration.md).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# YAML has no path type: a path is written as a string, so these fields take one.
FilePath = Annotated[Path, Field(strict=False)]


def _not_from_the_file(_value: Any) -> Any:
    # A secret never comes from the file, which more people and tools read than should see
    # a secret: a key for one is refused as unknown, as any key the file may not hold.
    raise PydanticCustomError("extra_forbidden", "Extra inputs are not permitted")


# A secret read from the environment variable its `*_env` key names, once, when settings are
# built (`settings_from_mapping`). SecretBytes: a repr, str or log line shows `**********`.
EnvSecret = Annotated[
    SecretBytes | None, BeforeValidator(_not_from_the_file), Field(default=None, exclude=True)
]


class VaultAuth(_Strict):
    method: Literal["token", "approle", "kubernetes"] = "token"
    token: str | None = None
    role_id: str | None = None
    secret_id: str | None = None
    role: str | None = None
    mount: str | None = None  # auth mount path; defaults to the method name
    jwt_path: str = "/var/run/secrets/kubernetes.io/serviceaccount/token"

    @model_validator(mode="after")
    def _complete(self) -> VaultAuth:
        needed = {"token": ["token"], "approle": ["role_id", "secret_id"], "kubernetes": ["role"]}
        for key in needed[self.method]:
            if not getattr(self, key):
                raise ValueError(f"method {self.method!r} needs '{key}'")
        return self


class VaultSettings(_Strict):
    addr: str
    auth: VaultAuth
    namespace: str | None = None
    timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    # Token role the per-task tokens are created through (orphan, non-renewable).
    task_token_role: str = "broker-task"  # noqa: S105 (a role name, not a secret)
    # Prefix of the Vault ACL policies the broker writes for each task type.
    policy_prefix: str = "broker-task-"
    # Ready task tokens kept per task type and process, so a start skips one Vault call.
    # 0 mints each task's token on demand.
    task_token_pool: int = Field(default=2, ge=0, le=32)
    # A finish that revoked every lease of its task (in the process that started it) pools
    # the task's token for the next task of the same type instead of revoking it; false:
    # every task gets a token of its own that is revoked when the task ends.
    task_token_reuse: bool = True
    # How long a process's hold on its pooled tokens lasts unless renewed (every third of
    # it): after a crash, the scheduler revokes them this long after the last renewal.
    task_token_lease_seconds: float = Field(default=30.0, ge=1, le=600)
    verify_tls: bool = True

    @field_validator("addr")
    @classmethod
    def _http_url(cls, value: str) -> str:
        # Caught here, not as a 503 on every start: "vault:8200" or "" is a typo.
        parsed = urlsplit(value)
        if parsed.scheme not in {"http", "https"} or not parsed.hostname:
            raise ValueError(
                "must be an http:// or https:// URL with a host, e.g. https://vault.internal:8200"
            )
        return value


class IssuerSettings(_Strict):
    name: Annotated[str, Field(pattern=ISSUER_NAME_PATTERN)]
    issuer: Annotated[str, Field(min_length=1)]
    jwks_file: FilePath | None = None
    jwks_uri: str | None = None
    audiences: Annotated[list[str], Field(min_length=1)]
    kind: Literal["spiffe", "oidc"] = "oidc"
    trust_domain: str | None = None
    groups_claim: str = "groups"
    use: Annotated[list[IdentityUse], Field(min_length=1)]
    single_use: bool = False
    algorithms: list[str] | None = None
    # Refuse tokens whose exp - iat exceeds this (e.g. year-long Kubernetes tokens).
    max_token_lifetime_seconds: int | None = Field(default=None, gt=0)
    jwks_cache_seconds: int = Field(default=300, gt=0)
    jwks_refresh_cooldown_seconds: int = Field(default=30, ge=0)
    jwks_stale_seconds: int = Field(default=3600, ge=0)

    @field_validator("name")
    @classmethod
    def _not_a_scheme(cls, value: str) -> str:
        if value in RESERVED_ISSUER_NAMES:
            raise ValueError(f"{value!r} is reserved: workload ids '{value}:<sub>' would read as URIs")
        return value

    @field_validator("use", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("algorithms")
    @classmethod
    def _asymmetric_only(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            bad = sorted(set(value) - ASYMMETRIC_ALGORITHMS)
            if bad or not value:
                raise ValueError(f"only asymmetric algorithms are allowed, not {bad or 'none'}")
        return value

    @model_validator(mode="after")
    def _key_source(self) -> IssuerSettings:
        if (self.jwks_file is None) == (self.jwks_uri is None):
            raise ValueError("exactly one of 'jwks_file' or 'jwks_uri' is required")
        if self.jwks_uri is not None and not _trusted_url(self.jwks_uri):
            raise ValueError("'jwks_uri' must be https:// (plain http only on a loopback address)")
        if self.trust_domain is not None and not _TRUST_DOMAIN.fullmatch(self.trust_domain):
            raise ValueError("'trust_domain' must be lowercase letters, digits, '.', '-' or '_'")
        if self.kind == "spiffe" and not self.trust_domain:
            raise ValueError("kind 'spiffe' needs 'trust_domain'")
        if self.kind == "spiffe" and self.algorithms:
            bad = sorted(set(self.algorithms) - SPIFFE_ALGORITHMS)
            if bad:
                raise ValueError(f"JWT-SVIDs allow RS/ES/PS algorithms only, not {bad}")
        return self

    @property
    def allowed_algorithms(self) -> list[str]:
        if self.algorithms:
            return list(self.algorithms)
        return sorted(SPIFFE_ALGORITHMS if self.kind == "spiffe" else ASYMMETRIC_ALGORITHMS)


class OperatorSettings(_Strict):
    groups: list[str] = Field(default_factory=list)


class LimitSettings(_Strict):
    max_body_bytes: int = Field(default=65536, gt=0)
    clock_skew_seconds: int = Field(default=30, ge=0, le=300)
    max_token_bytes: int = Field(default=8192, gt=0)
    max_context_bytes: int = Field(default=8192, gt=0)


class SchedulerSettings(_Strict):
    sweep_interval_seconds: float = Field(default=1.0, gt=0, le=60)
    revoke_workers: int = Field(default=8, ge=1, le=64)
    retry_base_seconds: float = Field(default=2.0, gt=0)
    retry_max_seconds: float = Field(default=300.0, gt=0)
    # Vault leases no task owns are revoked only after this grace, so a start that is
    # still between Vault and its commit is never raced.
    # 30 s is above what a start can take with the default Vault timeout (5 s a call) and
    # a few credentials; one the reconciler overtakes fails at its commit, safely.
    orphan_grace_seconds: int = Field(default=30, ge=0)
    reconcile_interval_seconds: float = Field(default=10.0, gt=0)


class NotifySettings(_Strict):
    webhook_url: str

    @field_validator("webhook_url")
    @classmethod
    def _https(cls, value: str) -> str:
        if not _trusted_url(value):
            raise ValueError("must be https:// (plain http only on a loopback address)")
        return value

    # Name of the environment variable holding the HMAC key that signs `webhook` bodies.
    secret_env: str | None = None
    secret: EnvSecret = None
    timeout_seconds: float = Field(default=3.0, gt=0, le=30)
    # The receiver's message shape: the broker's own signed JSON event, a Slack incoming
    # webhook, or a Microsoft Teams (Workflows) webhook taking an Adaptive Card.
    format: Literal["webhook", "slack", "teams"] = "webhook"
    # Where people reach the broker (its console): messages link to the approval page.
    console_url: str | None = None
    # Deliveries that got no answer, 429 or 5xx are retried this often, backing off from
    # `retry_base_seconds` (doubling, at most 30 s); a start never waits for any of it.
    retries: int = Field(default=3, ge=0, le=10)
    retry_base_seconds: float = Field(default=1.0, gt=0, le=30)

    @field_validator("console_url")
    @classmethod
    def _console_https(cls, value: str | None) -> str | None:
        if value is not None and not _trusted_url(value):
            raise ValueError("must be https:// (plain http only on a loopback address)")
        return value


class TracingSettings(_Strict):
    # `otlp`: OTLP over HTTP to the endpoint the standard OTEL_EXPORTER_OTLP_* variables
    # name (needs the `otel` extra); `console`: spans printed to stdout, for a first look.
    exporter: Literal["otlp", "console"] = "otlp"
    service_name: str = "credential-broker"


class AuditSettings(_Strict):
    # Name of the environment variable holding the HMAC key for the audit chain. Without
    # the key the chain is plain SHA-256: it still detects edits by anyone who doesn't
    # recompute every later link, but a database admin could; with a key, they can't.
    key_env: str = "BROKER_AUDIT_KEY"
    key: EnvSecret = None

    @property
    def key_bytes(self) -> bytes | None:
        return self.key.get_secret_value() if self.key is not None else None


def _host_port(value: str) -> str:
    host, _, port = value.rpartition(":")
    # A port, not 0: the API's workers write it into handles without asking the gateway.
    if not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError("must be HOST:PORT")
    return value


HostPort = Annotated[str, AfterValidator(_host_port)]


class GatewaySettings(_Strict):
    """The gateway (docs/gateway.md): credentials a workload uses through the broker but never
    holds. Configured, `broker serve` runs it beside the API; `broker gateway` runs it alone."""

    # Where the Postgres wire protocol listens, and what handles name as their host (the
    # address workloads reach this gateway, or the Service in front of its replicas, by).
    postgres_bind: HostPort = "127.0.0.1:6432"
    advertise_host: str = "127.0.0.1"
    # The port handles name, when a load balancer's differs from the bind's.
    advertise_port: int | None = Field(default=None, gt=0, le=65535)
    # TLS offered on the Postgres port (SSLRequest). With `require_tls` a client that does
    # not ask for it is refused, and handles say `sslmode=require`.
    tls_cert_file: FilePath | None = None
    tls_key_file: FilePath | None = None
    require_tls: bool = False
    # How often queued statement events are written to the audit chain, at the latest
    # (docs/gateway.md, "What is lost if a gateway dies").
    audit_flush_seconds: float = Field(default=0.5, gt=0, le=10)
    # How often live sessions are checked against the ledger, besides the notifications.
    recheck_seconds: float = Field(default=1.0, gt=0, le=30)
    # Where the Vault API for `vault_token` gateway credentials listens (HTTP); unset, the
    # gateway serves no Vault API and a start with such a credential is refused.
    http_bind: HostPort | None = None
    # The port Vault handles name (`addr`), when a load balancer's differs from the bind's.
    advertise_http_port: int | None = Field(default=None, gt=0, le=65535)

    @property
    def postgres_host(self) -> str:
        return self.postgres_bind.rpartition(":")[0].strip("[]")

    @property
    def postgres_port(self) -> int:
        return int(self.postgres_bind.rpartition(":")[2])

    @property
    def http_host(self) -> str | None:
        return self.http_bind.rpartition(":")[0].strip("[]") if self.http_bind else None

    @property
    def http_port(self) -> int | None:
        return int(self.http_bind.rpartition(":")[2]) if self.http_bind else None

    @model_validator(mode="after")
    def _tls_pair(self) -> GatewaySettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.require_tls and self.tls_cert_file is None:
            raise ValueError("require_tls needs tls_cert_file and tls_key_file")
        if self.http_bind is not None and self.http_port == self.postgres_port:
            raise ValueError("http_bind and postgres_bind need different ports")
        return self


class Settings(_Strict):
    database_url: str
    vault: VaultSettings
    policy_file: FilePath
    issuers: list[IssuerSettings] = Field(default_factory=list)
    operators: OperatorSettings = Field(default_factory=OperatorSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    notify: NotifySettings | None = None
    audit: AuditSettings = Field(default_factory=AuditSettings)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # `text` for a terminal; `json` for a collector: one object a line with the request id,
    # route, status, task and workload of the request it belongs to.
    log_format: Literal["text", "json"] = "text"
    # OpenTelemetry spans for requests and their policy, Vault and database steps; off
    # (and free) unless set.
    tracing: TracingSettings | None = None
    gateway: GatewaySettings | None = None

    @field_validator("database_url")
    @classmethod
    def _postgres_only(cls, value: str) -> str:
        if not value.startswith(("postgresql://", "postgresql+psycopg://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")
        return value

    @model_validator(mode="after")
    def _unique_issuers(self) -> Settings:
        names = [i.name for i in self.issuers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"issuer names must be unique: {dupes}")
        isses = [i.issuer for i in self.issuers]
        if len(set(isses)) != len(isses):
            raise ValueError("two issuers share one 'issuer' (iss) value")
        domains = [i.trust_domain for i in self.issuers if i.kind == "spiffe"]
        shared = sorted({d for d in domains if d is not None and domains.count(d) > 1})
        if shared:
            # The SPIFFE ID is the workload id: two issuers for one trust domain would each
            # be able to speak for the other's workloads.
            raise ValueError(f"one spiffe issuer per trust domain: {shared} has more")
        return self

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL with the psycopg 3 driver spelled out."""
        url = self.database_url
        for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url


ENV_OVERRIDES: Mapping[str, tuple[str, ...]] = {
    "BROKER_DATABASE_URL": ("database_url",),
    "BROKER_VAULT_ADDR": ("vault", "addr"),
    "BROKER_VAULT_TOKEN": ("vault", "auth", "token"),
    "BROKER_POLICY_FILE": ("policy_file",),
}


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    for var, path in ENV_OVERRIDES.items():
        if var not in env:
            continue
        node = raw
        for key in path[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
        node[path[-1]] = env[var]
        if var == "BROKER_VAULT_TOKEN":
            # Setting a token in the environment means "log in with this token", even if
            # the file names another method: silently ignoring it would surprise.
            node["method"] = "token"
    return raw


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"config: unknown key '{key}' (check its spelling)"
    if kind == "missing":
        return f"config: missing required key '{key}'"
    message = first["msg"].removeprefix("Value error, ")
    return f"config: bad value for '{key}': {message}"


def _with_secrets(settings: Settings, env: Mapping[str, str]) -> Settings:
    """`settings` holding the secrets its `*_env` keys name; an unset or empty one is None."""

    def read(var: str | None) -> SecretBytes | None:
        value = env.get(var, "") if var else ""
        return SecretBytes(value.encode()) if value else None

    # model_copy: the fields refuse every value given to validation (`_not_from_the_file`).
    update: dict[str, Any] = {
        "audit": settings.audit.model_copy(update={"key": read(settings.audit.key_env)})
    }
    if settings.notify is not None:
        update["notify"] = settings.notify.model_copy(update={"secret": read(settings.notify.secret_env)})
    return settings.model_copy(update=update)


def settings_from_mapping(raw: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Settings:
    """Validate `raw` with the overrides and secrets `env` (default: os.environ) holds."""
    environ = os.environ if env is None else env
    data = _apply_env(copy.deepcopy(dict(raw)), environ)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None
    return _with_secrets(settings, environ)


def load_settings(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Read the YAML named by `path` or `BROKER_CONFIG`, apply env overrides, validate."""
    environ = os.environ if env is None else env
    source = path or environ.get("BROKER_CONFIG")
    raw: Any = {}
    if source:
        try:
            raw = yaml.safe_load(Path(source).read_text(encoding="utf-8")) or {}
        except OSError as error:
            raise ConfigError(f"config: cannot read {source}: {error.strerror}") from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config: {source} is not valid YAML{where}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config: {source} must hold a mapping at the top level")
    try:
        return settings_from_mapping(raw, environ)
    except ConfigError as error:
        if source:
            raise
        # Most likely not a bad config but none at all: say where one is looked for.
        raise ConfigError(f"{error} (no config file given: use --config FILE or BROKER_CONFIG)") from None
