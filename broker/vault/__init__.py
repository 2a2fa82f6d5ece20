"""Vault/OpenBao access: per-task tokens, dynamic secrets, synchronous revocation."""

from broker.vault.errors import VaultError, VaultRejected, VaultUnavailable
from broker.vault.gateway import VaultGateway
from broker.vault.policies import policy_name, render_task_policy, task_token_policies
from broker.vault.types import IssuedSecret, RevokeHandle, TaskToken

__all__ = [
    "IssuedSecret",
    "RevokeHandle",
    "TaskToken",
    "VaultError",
    "VaultGateway",
    "VaultRejected",
    "VaultUnavailable",
    "policy_name",
    "render_task_policy",
    "task_token_policies",
]
