"""Without a browser: every /console response is locked down, and the templates stay clean."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from broker.audit.events import AUDIT_EVENTS
from broker.console import SECURITY_HEADERS

TEMPLATES = Path(__file__).resolve().parents[2] / "broker" / "console" / "templates"
# Fixed, so every test worker collects the same parametrized ids.
SOME_ID = "f55813d4-bf91-427a-a0a7-da11f43157b2"

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/console/", 200),
        ("/console/leases", 200),
        (f"/console/leases/{SOME_ID}", 200),
        (f"/console/tasks/{SOME_ID}", 200),
        ("/console/approvals", 200),
        (f"/console/approvals/{SOME_ID}", 200),
        ("/console/kill-switch", 200),
        ("/console/audit", 200),
        ("/console/static/console.js", 200),
        ("/console/static/console.css", 200),
        ("/console", 308),
        ("/console/leases/not-a-uuid", 404),
        ("/console/approvals/1%20or%201", 404),
        ("/console/nothing-here", 404),
        ("/console/static/nothing.js", 404),
    ],
)
def test_every_console_response_carries_the_security_headers(client, path, status):
    response = client.get(path)
    assert response.status_code == status
    assert response.headers["Content-Security-Policy"] == CSP
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert response.headers["Cache-Control"] == "no-store"
    assert "Set-Cookie" not in response.headers


def test_a_post_to_a_page_is_refused_and_still_locked_down(client):
    response = client.post("/console/leases")
    assert response.status_code == 405
    assert response.headers["Content-Security-Policy"] == CSP


def test_the_api_itself_is_left_alone(client):
    assert "Content-Security-Policy" not in client.get("/healthz").headers


def test_the_policy_in_the_module_is_the_one_documented():
    assert SECURITY_HEADERS["Content-Security-Policy"] == CSP


def test_pages_hold_no_data_and_name_only_same_origin_files(client):
    page = client.get(f"/console/tasks/{SOME_ID}").get_data(as_text=True)
    assert f'data-subject="{SOME_ID}"' in page
    assert re.findall(r'<script[^>]*src="([^"]+)"', page) == ["/console/static/console.js"]
    assert re.findall(r'<link[^>]*href="([^"]+)"', page) == [
        "/console/static/favicon.svg",
        "/console/static/console.css",
    ]
    assert "Bearer ey" not in page


def test_the_audit_filter_offers_every_recorded_event_in_a_tasks_order(client):
    page = client.get("/console/audit").get_data(as_text=True)
    assert re.findall(r'<option value="([^"]+)">', page) == list(AUDIT_EVENTS)


def test_static_scripts_are_served_as_javascript(client):
    for name in ("console.js", "api.js", "dom.js", "dialog.js", "operator.js", "approver.js"):
        response = client.get(f"/console/static/{name}")
        assert response.status_code == 200, name
        assert response.mimetype == "text/javascript", name


@pytest.mark.parametrize("template", sorted(TEMPLATES.rglob("*.html")), ids=lambda p: p.name)
def test_templates_have_no_inline_script_or_style(template):
    text = template.read_text()
    for match in re.finditer(r"<script\b([^>]*)>(.*?)</script>", text, re.S | re.I):
        attributes, body = match.groups()
        assert "src=" in attributes, f"{template.name}: a <script> without src"
        assert not body.strip(), f"{template.name}: an inline script body"
    assert not re.search(r"\sstyle\s*=", text, re.I), f"{template.name}: a style= attribute"
    assert not re.search(r"<style\b", text, re.I), f"{template.name}: a <style> element"
    assert not re.search(r"\son[a-z]+\s*=", text, re.I), f"{template.name}: an inline event handler"
    assert "javascript:" not in text.lower(), f"{template.name}: a javascript: URL"
    assert "|safe" not in text.replace(" ", ""), f"{template.name}: autoescaping turned off"


def test_scripts_never_parse_markup_from_strings():
    static = TEMPLATES.parent / "static"
    for script in static.glob("*.js"):
        text = script.read_text()
        for sink in (
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
        ):
            assert sink not in text, f"{script.name} uses {sink}"
