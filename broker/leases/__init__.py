"""Leases: revocation (shared by finish, the scheduler and operators) and the inventory."""
