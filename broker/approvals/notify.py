"""Approval notifications (config `notify`): approvers learn that a task waits for them.

Three shapes, the ones people wire up: the broker's own JSON event signed with
HMAC-SHA256 (`format: webhook`), a Slack incoming webhook message (`slack`) and a
Microsoft Teams Adaptive Card message (`teams`). Each carries the full request (task,
workload, owner, purpose, context, what would be issued) and a link to the console's
approval page; never a secret value, which the broker does not have before approval.

Sent from a background thread with a bounded queue, so a slow or dead receiver never
slows a request; a full queue drops (and logs) rather than blocking. A failed delivery
(no answer, 429 or 5xx) is retried with exponential backoff; a start never waits for it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import queue
import threading
import time
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any

import requests

from broker.config import NotifySettings

log = logging.getLogger(__name__)
SIGNATURE_HEADER = "X-Broker-Signature"
# The signature over `<timestamp>.<body>`: a captured delivery replayed later carries an old
# timestamp the receiver refuses, and a fresh timestamp breaks this signature.
TIMESTAMP_HEADER = "X-Broker-Timestamp"
TIMESTAMPED_SIGNATURE_HEADER = "X-Broker-Signature-V2"
_RETRYABLE = frozenset({408, 425, 429, 500, 502, 503, 504})


def sign(secret: bytes, body: bytes) -> str:
    # Body only: kept for receivers written before the timestamped signature.
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def sign_timestamped(secret: bytes, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify_timestamped(
    secret: bytes, timestamp: str, body: bytes, signature: str, *, now: float, tolerance: float = 300
) -> bool:
    """The receiver's check (docs/configuration.md): signature fits and the timestamp is fresh."""
    try:
        fresh = abs(now - int(timestamp)) <= tolerance
    except ValueError:
        return False
    return fresh and hmac.compare_digest(sign_timestamped(secret, timestamp, body), signature)


def approval_url(settings: NotifySettings, task_id: str) -> str | None:
    if settings.console_url is None:
        return None
    return f"{settings.console_url.rstrip('/')}/console/approvals/{task_id}"


def webhook_body(event: str, payload: Mapping[str, Any], link: str | None) -> dict[str, Any]:
    body = {"event": event, **payload}
    if link is not None:
        body["approval_url"] = link
    return body


_HEADLINES = {
    "approval.requested": "Approval needed",
    "approval.granted": "Approved",
    "approval.denied": "Denied",
}


def _facts(payload: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The request as label/value pairs, in the order an approver reads them."""
    facts = [
        ("Task", payload.get("task")),
        ("Owner", payload.get("owner")),
        ("Purpose", payload.get("purpose")),
        ("Workload", payload.get("workload")),
        ("TTL", f"{payload['ttl_seconds']} s" if payload.get("ttl_seconds") else None),
        ("Context", json.dumps(payload["context"], sort_keys=True) if payload.get("context") else None),
        ("Would issue", _issued(payload.get("credentials"))),
        ("Approvers", ", ".join(payload.get("approver_groups") or []) or None),
        ("Decided by", payload.get("approver")),
        ("Reason", payload.get("reason")),
        ("Approval lapses", payload.get("approval_expires_at")),
        ("Task id", payload.get("task_id")),
    ]
    return [(label, _inert(str(value))) for label, value in facts if value]


def _inert(text: str) -> str:
    # A newline in a purpose would start a forged `*Owner:*` line, and bidi or invisible
    # characters make an approver read other text than is there: show them as code points.
    return "".join(
        f"U+{ord(char):04X}" if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp") else char
        for char in text
    )


def _issued(credentials: Any) -> str | None:
    if not credentials:
        return None
    return ", ".join(f"{item['name']} ({item['kind']})" for item in credentials)


def _slack_escape(text: str) -> str:
    # Slack's own rule for message text: without it a purpose of `<!channel>` pings a whole
    # channel, and `<https://evil|approve>` renders as a disguised link.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_SLACK_SECTION_LIMIT = 3000  # Slack refuses a section text longer than this


def _shorten_escaped(text: str, budget: int) -> str:
    """`text` Slack-escaped, cut to `budget` characters between escapes, never inside one."""
    out: list[str] = []
    used = 0
    for char in text:
        piece = _slack_escape(char)
        if used + len(piece) > budget - 1:
            return "".join(out) + "…"
        out.append(piece)
        used += len(piece)
    return "".join(out)


def _slack_lines(facts: list[tuple[str, str]]) -> str:
    # Only the workload may be shortened: task, owner, what is issued, approvers and the
    # task id are what an approver decides on, so they always appear in full.
    def line(label: str, value: str) -> str:
        return f"*{label}:* {value}"

    escaped = [(label, _slack_escape(value)) for label, value in facts]
    total = len("\n".join(line(label, value) for label, value in escaped))
    if total <= _SLACK_SECTION_LIMIT:
        return "\n".join(line(label, value) for label, value in escaped)
    raw = dict(facts)
    budget = (
        max(1, len(dict(escaped)["Workload"]) - (total - _SLACK_SECTION_LIMIT)) if "Workload" in raw else 0
    )
    return "\n".join(
        line(label, _shorten_escaped(raw[label], budget) if label == "Workload" else value)
        for label, value in escaped
    )


def slack_body(event: str, payload: Mapping[str, Any], link: str | None) -> dict[str, Any]:
    headline = _inert(f"{_HEADLINES.get(event, event)}: {payload.get('task', '')}")
    lines = _slack_lines(_facts(payload))
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": headline[:150]}},
        # verbatim: a bare URL or #channel in user text is not turned into a link by Slack.
        {"type": "section", "text": {"type": "mrkdwn", "text": lines, "verbatim": True}},
    ]
    if link is not None and event == "approval.requested":
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {"type": "button", "text": {"type": "plain_text", "text": "Review"}, "url": link}
                ],
            }
        )
    return {"text": _slack_escape(headline), "blocks": blocks}


def _teams_escape(text: str) -> str:
    # Adaptive Card text is a Markdown subset: keep workload text from becoming a link or
    # formatting that changes what an approver reads.
    return "".join("\\" + char if char in "\\[]()*_`#>~" else char for char in text)


def teams_body(event: str, payload: Mapping[str, Any], link: str | None) -> dict[str, Any]:
    card: dict[str, Any] = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": [
            {
                "type": "TextBlock",
                "size": "Medium",
                "weight": "Bolder",
                "wrap": True,
                "text": _teams_escape(_inert(f"{_HEADLINES.get(event, event)}: {payload.get('task', '')}")),
            },
            {
                "type": "FactSet",
                "facts": [
                    {"title": label, "value": _teams_escape(value)} for label, value in _facts(payload)
                ],
            },
        ],
    }
    if link is not None and event == "approval.requested":
        card["actions"] = [{"type": "Action.OpenUrl", "title": "Review", "url": link}]
    return {
        "type": "message",
        "attachments": [{"contentType": "application/vnd.microsoft.card.adaptive", "content": card}],
    }


_SHAPES: dict[str, Callable[[str, Mapping[str, Any], str | None], dict[str, Any]]] = {
    "webhook": webhook_body,
    "slack": slack_body,
    "teams": teams_body,
}


class Notifier:
    def __init__(
        self,
        settings: NotifySettings | None,
        *,
        capacity: int = 1000,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._settings = settings
        # Kept wrapped until a body is signed, so no repr of the notifier shows it.
        self._secret = settings.secret if settings else None
        self._queue: queue.Queue[bytes] = queue.Queue(maxsize=capacity)
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()
        self._sleep = sleep

    def send(self, event: str, payload: Mapping[str, Any]) -> None:
        if self._settings is None:
            return
        link = approval_url(self._settings, str(payload.get("task_id", "")))
        shape = _SHAPES[self._settings.format]
        body = json.dumps(shape(event, payload, link), default=str, sort_keys=True).encode()
        try:
            self._queue.put_nowait(body)
        except queue.Full:
            log.warning("notification queue full; dropped %s", event)
            return
        self._ensure_worker()

    def _ensure_worker(self) -> None:
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="notify", daemon=True)
                self._worker.start()

    def _run(self) -> None:
        session = requests.Session()
        while True:
            body = self._queue.get()
            try:
                self._deliver(session, body)
            finally:
                self._queue.task_done()

    def _deliver(self, session: requests.Session, body: bytes) -> None:
        settings = self._settings
        assert settings is not None
        headers = {"Content-Type": "application/json"}
        if self._secret is not None:
            secret = self._secret.get_secret_value()
            timestamp = str(int(time.time()))
            headers[SIGNATURE_HEADER] = sign(secret, body)
            headers[TIMESTAMP_HEADER] = timestamp
            headers[TIMESTAMPED_SIGNATURE_HEADER] = sign_timestamped(secret, timestamp, body)
        for attempt in range(settings.retries + 1):
            if attempt:
                self._sleep(min(30.0, settings.retry_base_seconds * 2 ** (attempt - 1)))
            try:
                response = session.post(
                    settings.webhook_url,
                    data=body,
                    headers=headers,
                    timeout=settings.timeout_seconds,
                    allow_redirects=False,
                )
            except requests.RequestException as error:
                log.warning("notification failed (attempt %d): %s", attempt + 1, type(error).__name__)
                continue
            if response.status_code < 300:
                return
            log.warning("notification answered HTTP %s (attempt %d)", response.status_code, attempt + 1)
            if response.status_code not in _RETRYABLE:
                return
        log.error("notification given up after %d attempts", settings.retries + 1)

    def drain(self, timeout: float = 5.0) -> None:
        """Wait until queued notifications were sent (tests, shutdown)."""
        done = threading.Event()

        def wait_for_queue() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait_for_queue, daemon=True).start()
        done.wait(timeout)
