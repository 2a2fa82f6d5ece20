"""The Grafana dashboard and the alert rules (deploy/) use only metrics the broker exports.

The exported names come from a real /metrics answer of the app on the test stack, so a
renamed metric breaks this test rather than a dashboard nobody looks at until an incident."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "credential-broker.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
BROKER_METRIC = re.compile(r"\bbroker_[a-z0-9_]+\b")
# The series each metric type exposes (the text format's sample names).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}
DURATION = re.compile(r"^\d+[smhdwy]$")


def dashboard_expressions() -> list[str]:
    panels: list[dict[str, Any]] = json.loads(DASHBOARD.read_text())["panels"]
    nested = [inner for panel in panels for inner in panel.get("panels", [])]
    return [target["expr"] for panel in panels + nested for target in panel.get("targets", [])]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


@pytest.fixture
def exported(client) -> set[str]:
    # Some traffic first, so labelled series exist as well as their HELP/TYPE lines.
    for path in ("/healthz", "/readyz", "/no-such-route"):
        client.get(path)
    response = client.get("/metrics")
    assert response.status_code == 200
    names: set[str] = set()
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        names.update(f"{family.name}{suffix}" for suffix in SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    assert "broker_request_seconds_count" in names  # the parse found the broker's own metrics
    return names


def test_every_metric_the_dashboard_and_the_alerts_use_is_exported(exported):
    expressions = dashboard_expressions() + [rule["expr"] for rule in alert_rules()]
    assert expressions
    for expr in expressions:
        used = set(BROKER_METRIC.findall(expr))
        assert used, f"uses no broker metric: {expr}"
        assert used <= exported, f"{sorted(used - exported)} not in /metrics: {expr}"


def test_every_exported_broker_metric_is_on_the_dashboard(exported):
    used = {name for expr in dashboard_expressions() for name in BROKER_METRIC.findall(expr)}
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", name) for name in used}
    exported_families = {
        re.sub(r"_(total|bucket|sum|count|created)$", "", name)
        for name in exported
        if name.startswith("broker_")
    }
    assert exported_families <= families


def _balanced(expr: str) -> bool:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for char in re.sub(r'"[^"]*"', '""', expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            return False
    return not stack and expr.count('"') % 2 == 0


def test_the_alert_file_is_prometheus_rule_yaml():
    document = yaml.safe_load(ALERTS.read_text())
    assert set(document) == {"groups"}
    names = [group["name"] for group in document["groups"]]
    assert len(names) == len(set(names))
    alerts = set()
    for group in document["groups"]:
        assert set(group) <= {"name", "interval", "limit", "rules"}
        assert group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"])
            assert rule["alert"] not in alerts
            alerts.add(rule["alert"])
            assert isinstance(rule["expr"], str) and _balanced(rule["expr"]), rule["alert"]
            assert "for" not in rule or DURATION.match(rule["for"]), rule["alert"]
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
            assert all(isinstance(value, str) for value in rule["annotations"].values())


def test_the_alerts_cover_what_operations_needs_to_hear_about():
    expressions = " ".join(rule["expr"] for rule in alert_rules())
    for needed in (
        "broker_scheduler_last_success_timestamp_seconds",  # a stale heartbeat
        "broker_pending_revocations",  # revoke_pending stuck or growing
        "broker_revoke_failures_total",
        'status="503"',  # Vault or Postgres unavailable
        "broker_revocation_lag_seconds_bucket",  # deadline lag
    ):
        assert needed in expressions, needed


def test_the_dashboard_is_importable_json():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "credential-broker"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    [variable] = dashboard["templating"]["list"]
    assert variable == {**variable, "name": "datasource", "type": "datasource", "query": "prometheus"}
    for panel in dashboard["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert _balanced(target["expr"]), panel["title"]
