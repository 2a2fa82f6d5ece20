"""OpenTelemetry: spans for the request and its policy, Vault and database steps; nothing when off."""

from __future__ import annotations

import pytest

from broker import tracing
from broker.config import settings_from_mapping
from tests.conftest import broker_config
from tests.factories import AGENT, start_body


@pytest.fixture
def traced(stack, issuers, policy_file, clean_db):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from broker.app import create_app
    from broker.services import build_services

    settings = settings_from_mapping(
        broker_config(stack, issuers, policy_file, tracing={"exporter": "console"}), env={}
    )
    services = build_services(settings)
    exporter = InMemorySpanExporter()
    tracing.configure(settings.tracing, exporter=exporter)
    yield create_app(services=services).test_client(), exporter
    tracing.configure(None)
    services.close()


def test_a_start_is_one_request_span_with_policy_vault_and_database_steps_under_it(traced, issuers):
    client, exporter = traced
    answer = client.post("/task/start", json=start_body(), headers=issuers["spire"].bearer(AGENT))
    assert answer.status_code == 201
    password = answer.get_json()["credentials"]["db"]["data"]["password"]
    spans = exporter.get_finished_spans()
    [request] = [span for span in spans if span.name == "POST /task/start"]
    names = {span.name for span in spans}
    assert {"policy.evaluate", "vault", "db.transaction"} <= names
    # The request's own steps belong to its trace (the token pool refills in a thread of its
    # own, with traces of their own).
    mine = [span for span in spans if span.context.trace_id == request.context.trace_id]
    assert {"policy.evaluate", "db.transaction"} <= {span.name for span in mine}
    issued = [span for span in mine if str(span.attributes.get("vault.operation", "")).startswith("issue")]
    assert issued and all(span.parent.span_id == request.context.span_id for span in issued)
    for span in spans:  # identifiers only: no token, body or secret in any attribute
        assert all(password not in str(value) for value in span.attributes.values())
        assert "Bearer" not in str(dict(span.attributes))


def test_an_unknown_path_is_named_unmatched_not_by_its_path(traced):
    client, exporter = traced
    client.get("/no/such/3f0c-secret-looking-path")
    assert [span.name for span in exporter.get_finished_spans()] == ["GET unmatched"]


def test_off_every_step_gets_the_same_shared_no_op():
    tracing.configure(None)
    assert tracing.span("db.transaction") is tracing.span("vault", **{"vault.operation": "x"})
