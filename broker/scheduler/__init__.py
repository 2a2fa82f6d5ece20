"""The revocation scheduler: deadlines, retries, lapsed approvals, orphans (docs/contract.md §6.3-6.4)."""
