"""No secret reaches anything a person or a system reads: logs, spans, metrics, error bodies.

One broker with tracing on (an in-memory exporter), the JSON log formatter writing to a
buffer and pytest's `caplog`, at DEBUG so every record is built. A real start of the
`everything` task (one credential of each kind), a read, failing requests and a finish;
then every log record, every JSON line, every span (name and attributes), the /metrics text
and every error body is searched for every secret the test can name: each credential `data`
value, the workload JWT and its signature, the Vault token accessors of the task's lease
rows and the broker's own Vault token (every Vault call carries it or a pooled task token). Route fields, span names and metric labels must be the route template, never the raw
path with an id.
"""

from __future__ import annotations

import io
import json
import logging
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, text

from broker import logs, tracing
from broker.config import settings_from_mapping
from tests.conftest import broker_config
from tests.factories import AGENT, start_body

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
# Values shorter than this (a TTL, a flag, a serial's short field) can occur by chance in
# any text; every secret the broker hands out is far longer.
_MIN_SECRET = 8


@dataclass
class Readers:
    client: Any
    exporter: Any
    stream: io.StringIO
    caplog: pytest.LogCaptureFixture
    error_bodies: list[str] = field(default_factory=list)

    def reset(self) -> None:
        self.exporter.clear()
        self.stream.seek(0)
        self.stream.truncate()
        self.caplog.clear()
        self.error_bodies.clear()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        answer = self.client.open(path, method=method, **kwargs)
        if answer.status_code >= 400:
            self.error_bodies.append(answer.get_data(as_text=True))
        return answer

    def texts(self) -> dict[str, str]:
        """Everything a reader sees, by where it was seen."""
        seen: dict[str, str] = {}
        for index, record in enumerate(self.caplog.records):
            # The record's every attribute, not only its message: a field added with
            # `extra=` reaches a JSON collector even when the message leaves it out.
            seen[f"record {index}"] = record.getMessage() + " " + repr(vars(record))
        seen["json lines"] = self.stream.getvalue()
        for index, span in enumerate(self.exporter.get_finished_spans()):
            events = [(event.name, dict(event.attributes or {})) for event in span.events]
            seen[f"span {index}"] = f"{span.name} {dict(span.attributes or {})} {events} {span.status}"
        seen["metrics"] = self.client.get("/metrics").get_data(as_text=True)
        for index, body in enumerate(self.error_bodies):
            seen[f"error body {index}"] = body
        return seen

    def assert_none_of(self, secrets: set[str]) -> None:
        secrets = {secret for secret in secrets if len(secret) >= _MIN_SECRET}
        assert secrets
        for where, seen in self.texts().items():
            leaked = [secret[:12] + "..." for secret in secrets if secret in seen]
            assert not leaked, f"{where} carries a secret: {leaked}"

    def assert_route_templates_only(self) -> None:
        lines = [json.loads(line) for line in self.stream.getvalue().splitlines()]
        routes = [line["route"] for line in lines if "route" in line]
        assert routes
        names = [span.name for span in self.exporter.get_finished_spans()]
        labels = re.findall(r'endpoint="([^"]*)"', self.client.get("/metrics").get_data(as_text=True))
        assert labels
        for value in routes + names + labels:
            assert not _UUID.search(value), f"a raw path, not a route template: {value!r}"


@pytest.fixture
def readers(
    stack: Any, issuers: Any, policy_file: Any, clean_db: None, caplog: pytest.LogCaptureFixture
) -> Iterator[Readers]:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from broker.app import create_app
    from broker.services import build_services

    settings = settings_from_mapping(
        broker_config(stack, issuers, policy_file, tracing={"exporter": "console"}), env={}
    )
    services = build_services(settings)
    exporter = InMemorySpanExporter()
    tracing.configure(settings.tracing, exporter=exporter)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    logs.configure("DEBUG", "json", force=True)
    root.handlers[0].stream = stream  # type: ignore[attr-defined]
    caplog.set_level(logging.DEBUG)
    yield Readers(create_app(services=services).test_client(), exporter, stream, caplog)
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    tracing.configure(None)
    services.close()


def _values(data: Any) -> Iterator[str]:
    if isinstance(data, dict):
        for value in data.values():
            yield from _values(value)
    elif isinstance(data, list):
        for value in data:
            yield from _values(value)
    elif isinstance(data, str):
        yield data
        # A PEM's lines are as secret as the whole: a reader may log one line of it.
        yield from (line for line in data.splitlines() if "-----" not in line)


def _jwt_secrets(token: str) -> set[str]:
    return {token, token.rsplit(".", 1)[1]}


def _lease_secrets(stack: Any, task_id: str) -> set[str]:
    """The Vault token accessors the ledger holds for the task (its vault_token credential's)."""
    engine = create_engine(stack.database_url)
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT revoke_ref FROM leases WHERE task_id = :id AND revoke_kind = 'token'"),
            {"id": task_id},
        ).all()
    engine.dispose()
    return {row[0] for row in rows}


def test_a_start_read_failures_and_finish_put_no_secret_in_any_reader_and_only_route_templates(
    readers: Readers, issuers: Any, stack: Any
) -> None:
    token = issuers["spire"].mint(AGENT)
    bearer = {"Authorization": f"Bearer {token}"}
    started = readers.request("POST", "/task/start", json=start_body("everything"), headers=bearer)
    assert started.status_code == 201, started.get_data(as_text=True)
    answer = started.get_json()
    task_id = answer["task_id"]
    credentials = answer["credentials"]
    assert {"db", "token", "cert", "rw"} <= set(credentials)
    secrets = {value for cred in credentials.values() for value in _values(cred["data"])}
    secrets |= _jwt_secrets(token)
    accessors = _lease_secrets(stack, task_id)
    assert accessors, "the vault_token credential's accessor is in the ledger"
    secrets |= accessors
    secrets.add(stack.vault.broker_token)

    assert readers.request("GET", f"/task/{task_id}", headers=bearer).status_code == 200
    # Failing requests: an unknown task, a broken body, a mangled token, the JWT where it
    # doesn't belong (the query string, another header), an unmatched path holding it.
    assert readers.request("GET", f"/task/{uuid.uuid4()}", headers=bearer).status_code == 404
    assert readers.request("POST", "/task/start", data="{not json", headers=bearer).status_code >= 400
    assert (
        readers.request(
            "POST", "/task/finish", json={"task_id": task_id}, headers={"Authorization": f"Bearer {token}x"}
        ).status_code
        == 401
    )
    readers.request("GET", f"/task/{task_id}?access_token={token}", headers={"X-Auth-Token": token})
    readers.request("GET", f"/no/such/{token}")
    readers.request(
        "POST",
        "/task/start",
        json=start_body("everything", purpose=token),
        headers={"Authorization": f"Token {token}", "Proxy-Authorization": f"Bearer {token}"},
    )
    finished = readers.request("POST", "/task/finish", json={"task_id": task_id}, headers=bearer)
    assert finished.status_code == 200

    readers.assert_none_of(secrets)
    readers.assert_route_templates_only()
    routes = {json.loads(line).get("route") for line in readers.stream.getvalue().splitlines()}
    assert "/task/<uuid:task_id>" in routes
    assert any(span.name == "GET /task/<uuid:task_id>" for span in readers.exporter.get_finished_spans())


# What a secret looks like to someone who pastes one where it doesn't belong.
# (`everything` has no start limit: six examples a minute must not meet a 429.)
_TOKENISH = st.sampled_from(
    ["hvs.", "s.", "Bearer ", "eyJ", "-----BEGIN PRIVATE KEY-----", "password=", "token:"]
).flatmap(
    lambda prefix: st.text(
        alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=8, max_size=60
    ).map(lambda tail: prefix + tail)
)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    owner_tag=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.+-", min_size=1, max_size=20),
    purpose=_TOKENISH,
    header=st.sampled_from(["X-Api-Key", "X-Auth-Token", "Cookie", "X-Forwarded-Authorization"]),
    param=st.sampled_from(["token", "jwt", "access_token", "auth"]),
)
def test_token_like_owners_and_purposes_break_nothing_and_a_misplaced_jwt_is_not_logged(
    readers: Readers, issuers: Any, stack: Any, owner_tag: str, purpose: str, header: str, param: str
) -> None:
    readers.reset()
    token = issuers["spire"].mint(AGENT)
    owner = f"{owner_tag.strip('.') or 'x'}@example.com"
    started = readers.request(
        "POST",
        f"/task/start?{param}={token}",
        json=start_body("everything", owner=owner, purpose=purpose),
        headers={"Authorization": f"Bearer {token}", header: token},
    )
    assert started.status_code in (201, 400), started.get_data(as_text=True)
    secrets = _jwt_secrets(token) | {stack.vault.broker_token}
    if started.status_code == 201:
        answer = started.get_json()
        secrets |= {value for cred in answer["credentials"].values() for value in _values(cred["data"])}
        ended = readers.request(
            "POST",
            "/task/finish",
            json={"task_id": answer["task_id"]},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert ended.status_code == 200
    readers.assert_none_of(secrets)
    readers.assert_route_templates_only()
