"""The revocation scheduler: deadlines, retries, lapsed approvals, orphans (SPEC §6.3-6.4)."""
