"""Approvals: a different identity must say yes before a high-risk task gets anything."""
