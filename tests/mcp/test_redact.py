"""The redactor on its own: every encoding it promises, and text cut in the middle of a secret."""

from __future__ import annotations

import base64
import re
from urllib.parse import quote, quote_plus

import pytest

from broker.mcp.redact import Redactor

PASSWORD = "A1a-Zq9/+x~!pé"
CREDENTIALS = {"db": {"kind": "database", "data": {"username": "v-token-agent-1", "password": PASSWORD}}}


@pytest.mark.parametrize(
    "form",
    [
        PASSWORD,
        base64.b64encode(PASSWORD.encode()).decode(),
        base64.b64encode(PASSWORD.encode()).decode().rstrip("="),
        base64.urlsafe_b64encode(PASSWORD.encode()).decode(),
        base64.urlsafe_b64encode(PASSWORD.encode()).decode().rstrip("="),
        quote(PASSWORD, safe=""),
        re.sub("%[0-9A-F]{2}", lambda m: m.group(0).lower(), quote(PASSWORD, safe="")),
        quote_plus(PASSWORD),
        PASSWORD.encode().hex(),
        PASSWORD.encode().hex().upper(),
    ],
)
def test_each_encoding_is_redacted(form: str) -> None:
    assert Redactor([CREDENTIALS])(f"<{form}>") == "<[REDACTED:db]>"


@pytest.mark.parametrize("prefix", ["v-token-agent-1:", "x", "xy", "user="])
def test_a_secret_inside_a_longer_base64_text_is_redacted(prefix: str) -> None:
    blob = base64.b64encode(f"{prefix}{PASSWORD}!".encode()).decode()
    redacted = Redactor([CREDENTIALS])(blob)
    assert "[REDACTED:db]" in redacted
    # What is left around the marker is at most the characters that mix in other bytes.
    assert len(redacted.replace("[REDACTED:db]", "")) < len(blob) - len(PASSWORD)


def test_the_start_of_a_secret_left_by_truncation_is_cut() -> None:
    redactor = Redactor([CREDENTIALS])
    assert redactor.trim_partial_tail("output: " + PASSWORD[:6]) == "output: [REDACTED:db]"
    assert redactor.trim_partial_tail("output: A1") == "output: A1"


def test_values_too_short_to_be_secrets_are_left_alone() -> None:
    redactor = Redactor(
        [{"cert": {"kind": "pki", "data": {"private_key_type": "ec", "serial_number": "12:ab:cd:ef"}}}]
    )
    assert redactor("ec key 12:ab:cd:ef") == "ec key [REDACTED:cert]"
    assert Redactor()("nothing to hide") == "nothing to hide"
