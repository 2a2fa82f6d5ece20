"""Operators: the lease and task inventory, one-lease revocation and the kill switch."""
