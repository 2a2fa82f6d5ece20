"""The gateway: credentials a workload uses through the broker but never holds."""
