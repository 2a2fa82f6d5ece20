"""The tamper-evident audit log (docs/contract.md §6.8)."""

from broker.audit.chain import AuditRecorder, record, seal_pending, verify_chain

__all__ = ["AuditRecorder", "record", "seal_pending", "verify_chain"]
