"""The guards of approval notifications, each against a real receiver or the parsed payload."""

from __future__ import annotations

import json
import re
import threading
import time
import unicodedata
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretBytes

from broker.approvals.notify import (
    TIMESTAMP_HEADER,
    TIMESTAMPED_SIGNATURE_HEADER,
    Notifier,
    sign_timestamped,
    slack_body,
    teams_body,
    verify_timestamped,
)
from broker.config import NotifySettings

HOSTILE = [
    "<",
    ">",
    "&",
    "&amp;",
    "<!channel>",
    "<!here>",
    "<@U123>",
    "<#C123|general>",
    "<http://evil|click>",
    "*",
    "_",
    "~",
    "`",
    "```",
    "[x](http://evil)",
    "**",
    "\n",
    "\r\n",
    "\n*Owner:* mallory",
    '"}',
    "\\",
    '\\"',
    "\u202e",
    "\u2066",
    "\u200b",
    "\ufeff",
    "\x00",
    "# ",
    "> ",
    "http://evil.example",
]
hostile_text = st.lists(st.sampled_from(HOSTILE) | st.text(max_size=3), max_size=12).map("".join)


def _payload(task: str, workload: str, owner: str, purpose: str, context: str) -> dict[str, Any]:
    return {
        "task": task,
        "workload": workload,
        "owner": owner,
        "purpose": purpose,
        "context": {"note": context},
        "credentials": [{"name": "db", "kind": "database"}],
        "approver_groups": ["dba"],
        "task_id": "t-0123456789abcdef",
    }


def _no_invisible(text: str) -> None:
    assert not [c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]


@settings(max_examples=150, deadline=None)
@given(hostile_text, hostile_text, hostile_text, hostile_text, hostile_text)
def test_slack_shows_hostile_fields_as_inert_text(
    task: str, workload: str, owner: str, purpose: str, context: str
) -> None:
    raw = json.dumps(
        slack_body("approval.requested", _payload(task, workload, owner, purpose, context), None)
    )
    message = json.loads(raw)  # JSON-breaking text did not break the payload
    section = message["blocks"][1]["text"]
    assert section["verbatim"] is True  # bare URLs and #channels stay text
    lines = section["text"].split("\n")
    expected = [("Task", task), ("Owner", owner), ("Purpose", purpose), ("Workload", workload)]
    labels = [f"*{label}" for label, value in expected if value]
    labels += ["*Context", "*Would issue", "*Approvers", "*Task id"]
    # One line per fact: a newline in user text forged no extra `*Owner:*` line.
    assert [line.split(":*", 1)[0] for line in lines] == labels
    for line in lines:
        value = line.split(":* ", 1)[1]
        # No `<...>` at all: no mention, no channel ping, no disguised link.
        assert "<" not in value and ">" not in value
        assert re.fullmatch(r"([^&]|&amp;|&lt;|&gt;)*", value)
        _no_invisible(value)
    _no_invisible(message["text"])
    assert "<" not in message["text"] and ">" not in message["text"]


def _teams_unescape(value: str) -> str:
    """The literal text Teams shows; fails on any Markdown control character left unescaped."""
    out = []
    chars = iter(value)
    for char in chars:
        if char == "\\":
            out.append(next(chars))
        else:
            assert char not in "[]()*_`#>~", f"unescaped {char!r} in {value!r}"
            out.append(char)
    return "".join(out)


@settings(max_examples=150, deadline=None)
@given(hostile_text, hostile_text, hostile_text, hostile_text, hostile_text)
def test_teams_shows_hostile_fields_as_inert_text(
    task: str, workload: str, owner: str, purpose: str, context: str
) -> None:
    payload = _payload(task, workload, owner, purpose, context)
    message = json.loads(json.dumps(teams_body("approval.requested", payload, None)))
    card = message["attachments"][0]["content"]
    assert "actions" not in card  # no link without a console_url: none from user text
    texts = [card["body"][0]["text"]] + [fact["value"] for fact in card["body"][1]["facts"]]
    for text in texts:
        _no_invisible(text)
        _teams_unescape(text)
    facts = {fact["title"]: _teams_unescape(fact["value"]) for fact in card["body"][1]["facts"]}
    for label, value in (("Workload", workload), ("Owner", owner), ("Purpose", purpose)):
        if value:
            # The shown text is the user's, with only invisible characters spelled out.
            assert re.sub(r"U\+[0-9A-F]{4}", "", facts[label]) == "".join(
                c for c in value if unicodedata.category(c) not in ("Cc", "Cf", "Zl", "Zp")
            )


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.sampled_from(["<", ">", "&", "a", "<!channel>", "é"]), min_size=600, max_size=3000).map(
        "".join
    )
)
def test_slack_shortens_only_the_workload_and_never_inside_an_escape(workload: str) -> None:
    payload = _payload("deploy-prod", workload, "alice@example.com", "release", "prod")
    payload["approver_groups"] = ["dba", "security-officers"]
    section = slack_body("approval.requested", payload, None)["blocks"][1]["text"]["text"]
    assert len(section) <= 3000
    for fact in (
        "*Task:* deploy-prod",
        "*Owner:* alice@example.com",
        "*Would issue:* db (database)",
        "*Approvers:* dba, security-officers",
        "*Task id:* t-0123456789abcdef",
    ):
        assert fact in section.split("\n")
    [shown] = [line for line in section.split("\n") if line.startswith("*Workload:* ")]
    assert re.fullmatch(r"([^&<>]|&amp;|&lt;|&gt;)*…?", shown.removeprefix("*Workload:* "))


# --- delivery ---------------------------------------------------------------------------


class Receiver:
    """A loopback HTTP server answering `status` (after `delay` s) and recording each POST."""

    def __init__(self, status: int = 204, delay: float = 0.0, location: str | None = None) -> None:
        self.calls: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls.append((dict(self.headers), body))
                time.sleep(delay)
                self.send_response(status)
                if location is not None:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for receiver in made:
        receiver.close()


def _notifier(url: str, **settings_: Any) -> Notifier:
    notify = NotifySettings(webhook_url=url, retry_base_seconds=0.01, **settings_)
    notify = notify.model_copy(update={"secret": SecretBytes(b"k3y")})
    return Notifier(notify)


def _send(notifier: Notifier) -> None:
    notifier.send("approval.requested", _payload("deploy-prod", "w", "alice@example.com", "p", "c"))
    notifier.drain()


def test_a_redirect_is_not_followed_with_the_signed_body(receivers: list[Receiver]) -> None:
    elsewhere = Receiver()
    receivers.append(elsewhere)
    for status in (301, 302, 307, 308):
        first = Receiver(status=status, location=elsewhere.url)
        receivers.append(first)
        _send(_notifier(first.url, retries=2))
        assert len(first.calls) == 1  # a 3xx is final, not retried
    assert elsewhere.calls == []  # neither body nor signature went to the Location


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 422])
def test_a_4xx_is_final(receivers: list[Receiver], status: int) -> None:
    receiver = Receiver(status=status)
    receivers.append(receiver)
    _send(_notifier(receiver.url, retries=3))
    assert len(receiver.calls) == 1


@pytest.mark.parametrize("status", [429, 500, 503])
def test_a_5xx_or_429_is_retried_within_the_configured_bound(receivers: list[Receiver], status: int) -> None:
    receiver = Receiver(status=status)
    receivers.append(receiver)
    _send(_notifier(receiver.url, retries=2))
    assert len(receiver.calls) == 3


def test_a_timeout_is_retried_within_the_configured_bound(receivers: list[Receiver]) -> None:
    receiver = Receiver(delay=0.5)
    receivers.append(receiver)
    notifier = _notifier(receiver.url, retries=1, timeout_seconds=0.1)
    notifier.send("approval.requested", _payload("t", "w", "o", "p", "c"))
    notifier.drain(timeout=5)
    assert len(receiver.calls) == 2


def test_a_full_queue_drops_instead_of_blocking_the_sender(receivers: list[Receiver]) -> None:
    receiver = Receiver(delay=3)
    receivers.append(receiver)
    notify = NotifySettings(webhook_url=receiver.url, retries=0, timeout_seconds=5)
    notifier = Notifier(notify, capacity=1)
    started = time.monotonic()
    for _ in range(5):  # one in flight, one queued, the rest find the queue full
        notifier.send("approval.requested", _payload("t", "w", "o", "p", "c"))
    assert time.monotonic() - started < 1.5  # well before the receiver's 3 s answer


def test_the_signature_covers_a_timestamp_so_a_replay_fails(receivers: list[Receiver]) -> None:
    receiver = Receiver()
    receivers.append(receiver)
    _send(_notifier(receiver.url))
    [(headers, body)] = receiver.calls
    timestamp, signature = headers[TIMESTAMP_HEADER], headers[TIMESTAMPED_SIGNATURE_HEADER]
    assert abs(int(timestamp) - time.time()) < 60
    assert signature == sign_timestamped(b"k3y", timestamp, body)
    assert verify_timestamped(b"k3y", timestamp, body, signature, now=time.time())
    # A replay: an old delivery fails for age, and a fresh timestamp breaks the signature.
    assert not verify_timestamped(b"k3y", timestamp, body, signature, now=time.time() + 3600)
    fresh = str(int(timestamp) + 3600)
    assert not verify_timestamped(b"k3y", fresh, body, signature, now=time.time() + 3600)
    assert not verify_timestamped(b"k3y", timestamp, body + b" ", signature, now=time.time())
