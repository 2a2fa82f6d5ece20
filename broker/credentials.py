"""Credential templates of a task type (docs/contract.md §4 `credentials:`), shared by policy and vault."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_VAULT_PATH = r"^[A-Za-z0-9][A-Za-z0-9_./{}-]*$"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class _Credential(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatabaseCredential(_Credential):
    """`{mount}/creds/{role}` of a database secrets engine."""

    kind: Literal["database"]
    mount: Annotated[str, Field(pattern=_VAULT_PATH)] = "database"
    role: Annotated[str, Field(pattern=_NAME)]


class VaultTokenCredential(_Credential):
    """A Vault token carrying only `policies`, living as long as the task, not renewable."""

    kind: Literal["vault_token"]
    policies: Annotated[list[Annotated[str, Field(pattern=_NAME)]], Field(min_length=1)]


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


CredentialSpec = Annotated[
    DatabaseCredential | VaultTokenCredential | PkiCredential | LeaseCredential,
    Field(discriminator="kind"),
]
