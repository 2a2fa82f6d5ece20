"""The policy file's shape (docs/contract.md §4), validated strictly.

Every model forbids unknown keys and is strict about types: a typo such as `tll:` or a
quoted number `"300"` is an error at load time, never a silently ignored or coerced value,
because in a policy a quietly dropped key is usually a dropped restriction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from broker.config import ISSUER_NAME_PATTERN as CONFIG_ISSUER_NAME_PATTERN
from broker.credentials import CredentialSpec

TASK_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
CREDENTIAL_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
# Same spelling as `issuers[].name` in the broker config.
ISSUER_NAME_PATTERN = CONFIG_ISSUER_NAME_PATTERN

TaskName = Annotated[str, StringConstraints(pattern=TASK_NAME_PATTERN)]
CredentialName = Annotated[str, StringConstraints(pattern=CREDENTIAL_NAME_PATTERN)]
IssuerName = Annotated[str, StringConstraints(pattern=ISSUER_NAME_PATTERN)]
GlobPattern = Annotated[str, StringConstraints(min_length=1, max_length=500)]
CelSource = Annotated[str, StringConstraints(min_length=1, max_length=4000)]

_SCALAR_TYPES = (str, int, float, bool)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Ttl(_Strict):
    default: Annotated[int, Field(gt=0)]
    max: Annotated[int, Field(gt=0)]

    @model_validator(mode="after")
    def _default_within_max(self) -> Ttl:
        if self.default > self.max:
            raise ValueError(f"default ({self.default}) must not exceed max ({self.max})")
        return self


class WorkloadMatcher(_Strict):
    """One way to be allowed to start a task: issuer name, subject glob, exact claims."""

    issuer: IssuerName
    subject: GlobPattern
    # Each claim must be present and equal, type included ("true" is not true). A list
    # value must equal the claim's list exactly, in order.
    claims: dict[str, Any] = Field(default_factory=dict)

    @field_validator("claims")
    @classmethod
    def _scalar_or_list_of_scalars(cls, claims: dict[str, Any]) -> dict[str, Any]:
        for name, value in claims.items():
            items = value if isinstance(value, list) else [value]
            if not all(isinstance(item, _SCALAR_TYPES) for item in items):
                raise ValueError(f"claim {name!r} must be a string, number, boolean or a list of them")
        return claims


class Limits(_Strict):
    max_active_per_workload: Annotated[int, Field(gt=0)] | None = None
    max_starts_per_minute: Annotated[int, Field(gt=0)] | None = None


class Approvers(_Strict):
    groups: list[Annotated[str, StringConstraints(min_length=1)]] = Field(default_factory=list)
    # Globs matched against the approver's identity id, e.g. `corp-sso:*@example.com`.
    subjects: Annotated[list[GlobPattern], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _someone_can_approve(self) -> Approvers:
        # With neither, every approver token would qualify: refuse rather than guess.
        if not self.groups and not self.subjects:
            raise ValueError("name at least one approver group or subject")
        return self


class Approval(_Strict):
    required_when: CelSource | None = None
    approvers: Approvers
    min_approvals: Annotated[int, Field(ge=1)] = 1
    expires_in: Annotated[int, Field(gt=0)] = 600


class TaskPolicy(_Strict):
    description: Annotated[str, StringConstraints(min_length=1, max_length=500)]
    ttl: Ttl
    workloads: Annotated[list[WorkloadMatcher], Field(min_length=1)]
    owners: Annotated[list[GlobPattern], Field(min_length=1)]
    when: list[CelSource] = Field(default_factory=list)
    limits: Limits = Field(default_factory=Limits)
    approval: Approval | None = None
    credentials: Annotated[dict[CredentialName, CredentialSpec], Field(min_length=1)]


class PolicyFile(_Strict):
    tasks: dict[TaskName, TaskPolicy]


PathPart = str | int


def format_location(path: Sequence[PathPart]) -> str:
    """`('tasks', 'a', 'when', 0)` -> `tasks.a.when[0]`: the spelling errors use."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text or "(top level)"


@dataclass(frozen=True)
class PolicyIssue:
    """One problem in a policy file: where (path and, when known, line) and what."""

    path: tuple[PathPart, ...]
    message: str
    line: int | None = None

    @property
    def location(self) -> str:
        return format_location(self.path)

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        return f"{where}{self.location}: {self.message}"


class PolicyError(Exception):
    """A policy that can't be used; `errors` lists every problem found, one line each."""

    def __init__(self, message: str, issues: Sequence[PolicyIssue] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.issues: tuple[PolicyIssue, ...] = tuple(issues)
        self.errors: list[str] = [str(issue) for issue in self.issues]

    def __str__(self) -> str:
        return "; ".join([self.message, *self.errors])


class PolicyUnreadable(PolicyError):
    """The file could not be read or is not YAML at all (as opposed to a wrong policy)."""
