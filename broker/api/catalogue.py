"""GET /task-types: the task types the calling workload may start.

So an agent can pick what to ask for from what the policy would let it have, instead of
guessing names and meeting `unknown_task` or a denial; no Vault detail is shown.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify
from pydantic import BaseModel, ConfigDict

from broker.api.common import caller, query_args, services
from broker.policy.catalogue import CatalogueEntry, catalogue_for

bp = Blueprint("catalogue", __name__)


class NoQuery(BaseModel):
    # Unknown parameters are refused, as on every other endpoint: there is no filter yet.
    model_config = ConfigDict(extra="forbid")


@bp.get("/task-types")
def task_types() -> Any:
    identity = caller("workload")
    query_args(NoQuery)
    entries = catalogue_for(services().policies.current(), identity)
    return jsonify(items=[entry_json(entry) for entry in entries])


def entry_json(entry: CatalogueEntry) -> dict[str, Any]:
    return {
        "name": entry.name,
        "description": entry.description,
        "ttl": {"default": entry.ttl_default, "max": entry.ttl_max},
        "approval": entry.approval,
        "approver_groups": list(entry.approver_groups),
        "credentials": [{"name": item.name, "kind": item.kind} for item in entry.credentials],
    }


CATALOGUE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["items"],
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "description", "ttl", "approval", "approver_groups", "credentials"],
                "properties": {
                    "name": {"type": "string"},
                    "description": {"type": "string"},
                    "ttl": {
                        "type": "object",
                        "properties": {"default": {"type": "integer"}, "max": {"type": "integer"}},
                    },
                    "approval": {"enum": ["always", "conditional", "never"]},
                    "approver_groups": {"type": "array", "items": {"type": "string"}},
                    "credentials": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "name": {"type": "string"},
                                "kind": {"enum": ["database", "vault_token", "pki", "lease"]},
                            },
                        },
                    },
                },
            },
        }
    },
}
