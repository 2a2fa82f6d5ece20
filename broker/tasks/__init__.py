"""The task lifecycle: start, claim, finish, read."""
