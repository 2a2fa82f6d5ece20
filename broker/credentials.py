"""Credential templates of a task type (docs/contract.md §4 `credentials:`), shared by policy and vault."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

_VAULT_PATH = r"^[A-Za-z0-9][A-Za-z0-9_./{}-]*$"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class _Credential(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewayUpstream(_Credential):
    """The database a gateway credential's sessions go to (docs/gateway.md)."""

    host: Annotated[str, Field(min_length=1, max_length=255)]
    port: Annotated[int, Field(gt=0, le=65535)] = 5432
    dbname: Annotated[str, Field(min_length=1, max_length=63)]
    # TLS from the gateway to the database: `require` encrypts, `verify-full` also checks
    # the server's certificate and name against the system's CAs. Never a silent fallback.
    sslmode: Literal["disable", "require", "verify-full"] = "disable"


class StatementRule(_Credential):
    """A named statement rule; a plain string in `statements:` is named by its position."""

    name: Annotated[str, Field(pattern=_NAME, max_length=64)]
    when: Annotated[str, Field(min_length=1, max_length=4000)]


class DatabaseCredential(_Credential):
    """`{mount}/creds/{role}` of a database secrets engine.

    `delivery: gateway`: the workload gets a handle for the broker's gateway instead of the
    credential; the gateway connects to `upstream` with it, and each statement must meet
    every one of `statements` (CEL over `statement.command` and `statement.tables`)."""

    kind: Literal["database"]
    mount: Annotated[str, Field(pattern=_VAULT_PATH)] = "database"
    role: Annotated[str, Field(pattern=_NAME)]
    delivery: Literal["direct", "gateway"] = "direct"
    upstream: GatewayUpstream | None = None
    statements: list[Annotated[str, Field(min_length=1, max_length=4000)] | StatementRule] = Field(
        default_factory=list
    )

    @model_validator(mode="after")
    def _gateway_keys(self) -> DatabaseCredential:
        if self.delivery == "gateway" and self.upstream is None:
            raise ValueError("delivery: gateway needs `upstream: {host, port, dbname}`")
        if self.delivery == "direct" and (self.upstream is not None or self.statements):
            raise ValueError("`upstream` and `statements` apply to delivery: gateway only")
        return self

    @property
    def via_gateway(self) -> bool:
        return self.delivery == "gateway"


class VaultTokenCredential(_Credential):
    """A Vault token carrying only `policies`, living as long as the task, not renewable.

    `delivery: gateway`: the workload gets a handle token for the gateway's Vault API
    instead (docs/gateway.md, "Vault API"); the gateway holds the real token and relays
    only requests that meet every one of `requests` (CEL over `request.method` and
    `request.path`)."""

    kind: Literal["vault_token"]
    policies: Annotated[list[Annotated[str, Field(pattern=_NAME)]], Field(min_length=1)]
    delivery: Literal["direct", "gateway"] = "direct"
    requests: list[Annotated[str, Field(min_length=1, max_length=4000)] | StatementRule] = Field(
        default_factory=list
    )

    @model_validator(mode="after")
    def _gateway_keys(self) -> VaultTokenCredential:
        if self.delivery == "direct" and self.requests:
            raise ValueError("`requests` applies to delivery: gateway only")
        return self

    @property
    def via_gateway(self) -> bool:
        return self.delivery == "gateway"


class PkiCredential(_Credential):
    """`{mount}/issue/{role}`; `common_name` may use `{task_id}` and `{workload}`."""

    kind: Literal["pki"]
    mount: Annotated[str, Field(pattern=_VAULT_PATH)] = "pki"
    role: Annotated[str, Field(pattern=_NAME)]
    common_name: Annotated[str, Field(min_length=1, max_length=255)]
    alt_names: list[str] = Field(default_factory=list)


# An HTTP header name (RFC 9110 token) and the `{data.<field>}` placeholders of its value.
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")
_PLACEHOLDER = re.compile(r"\{data\.([A-Za-z0-9_-]{1,64})\}")
# Headers the gateway owns or the transport frames a request with: a template naming one
# could smuggle a second request or point the request elsewhere.
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "te", "trailer", "upgrade",
     "keep-alive", "x-broker-handle", "cookie"}
)  # fmt: skip


class HttpGateway(_Credential):
    """Where a `lease` gateway credential's requests go, and the header it is sent in
    (docs/gateway.md, "HTTP"). `upstream` fixes scheme, host, port and base path; the
    client's path is appended under it and nothing else."""

    upstream: Annotated[str, Field(min_length=1, max_length=2000)]
    header: Annotated[str, Field(min_length=1, max_length=1000)]

    @model_validator(mode="after")
    def _shape(self) -> HttpGateway:
        parts = urlsplit(self.upstream)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("gateway.upstream must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("gateway.upstream takes no query, fragment or user info")
        if any(segment in (".", "..") for segment in parts.path.split("/")):
            raise ValueError("gateway.upstream's path has no `.` or `..` segment")
        _ = parts.port  # raises ValueError on a bad port
        self.template()
        return self

    def template(self) -> tuple[str, str, tuple[str, ...]]:
        """(header name, value template, the `data` fields it names); ValueError if bad."""
        name, colon, value = self.header.partition(":")
        name, value = name.strip(), value.strip()
        if not colon or not _HEADER_NAME.match(name):
            raise ValueError('gateway.header is "<Header-Name>: <value with {data.<field>}>"')
        if name.lower() in _RESERVED_HEADERS or name.lower().startswith("proxy-"):
            raise ValueError(f"gateway.header may not set {name}")
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
            raise ValueError("gateway.header's value has no control characters")
        fields = tuple(_PLACEHOLDER.findall(value))
        if not fields:
            raise ValueError("gateway.header's value names at least one {data.<field>}")
        if "{" in _PLACEHOLDER.sub("", value) or "}" in _PLACEHOLDER.sub("", value):
            raise ValueError("gateway.header's placeholders are {data.<field>} only")
        return name, value, fields


class LeaseCredential(_Credential):
    """Any Vault path that answers with a lease (AWS, RabbitMQ, Consul, ...).

    `delivery: gateway`: the workload gets a URL and a handle for the gateway's HTTP proxy
    instead (docs/gateway.md, "HTTP"); the gateway sends requests to `gateway.upstream`
    only, with `gateway.header` filled from the lease's data, if they meet every one of
    `requests` (CEL over `request.method` and `request.path`)."""

    kind: Literal["lease"]
    path: Annotated[str, Field(pattern=_VAULT_PATH)]
    method: Literal["read", "write"] = "read"
    params: dict[str, Any] = Field(default_factory=dict)
    delivery: Literal["direct", "gateway"] = "direct"
    gateway: HttpGateway | None = None
    requests: list[Annotated[str, Field(min_length=1, max_length=4000)] | StatementRule] = Field(
        default_factory=list
    )

    @model_validator(mode="after")
    def _gateway_keys(self) -> LeaseCredential:
        if self.delivery == "gateway" and self.gateway is None:
            raise ValueError("delivery: gateway needs `gateway: {upstream, header}`")
        if self.delivery == "direct" and (self.gateway is not None or self.requests):
            raise ValueError("`gateway` and `requests` apply to delivery: gateway only")
        return self

    @property
    def via_gateway(self) -> bool:
        return self.delivery == "gateway"


def hashed_form(spec: CredentialSpec) -> dict[str, Any]:
    """A credential as an approval's request hash covers it: the gateway's keys only when
    set, so the hash of a credential written before they existed did not change."""
    form = spec.model_dump(mode="json")
    if isinstance(spec, DatabaseCredential) and not spec.via_gateway:
        for key in ("delivery", "upstream", "statements"):
            form.pop(key, None)
    if isinstance(spec, VaultTokenCredential) and not spec.via_gateway:
        for key in ("delivery", "requests"):
            form.pop(key, None)
    if isinstance(spec, LeaseCredential) and not spec.via_gateway:
        for key in ("delivery", "gateway", "requests"):
            form.pop(key, None)
    return form


CredentialSpec = Annotated[
    DatabaseCredential | VaultTokenCredential | PkiCredential | LeaseCredential,
    Field(discriminator="kind"),
]
