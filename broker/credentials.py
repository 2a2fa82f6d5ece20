"""Credential templates of a task type (docs/contract.md §4 `credentials:`), shared by policy and vault."""

from __future__ import annotations

from typing import Annotated, Any, Literal

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


class LeaseCredential(_Credential):
    """Any Vault path that answers with a lease (AWS, RabbitMQ, Consul, ...)."""

    kind: Literal["lease"]
    path: Annotated[str, Field(pattern=_VAULT_PATH)]
    method: Literal["read", "write"] = "read"
    params: dict[str, Any] = Field(default_factory=dict)


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
    return form


CredentialSpec = Annotated[
    DatabaseCredential | VaultTokenCredential | PkiCredential | LeaseCredential,
    Field(discriminator="kind"),
]
