"""Helpers shared by test packages (token minting: `tests.support.tokens`)."""
