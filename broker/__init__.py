"""Credential Broker: task-scoped, short-lived Vault/OpenBao credentials for attested workloads."""

__version__ = "0.1.0"
