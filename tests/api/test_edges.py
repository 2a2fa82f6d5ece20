"""HTTP edges of the whole app: content types of every answer, OPTIONS, and `limit` on every list."""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import event

from tests.factories import AGENT

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
JSON_TYPES = {"application/json", "application/problem+json"}
# The only answers that are not JSON, each on purpose: Prometheus text, and the console's
# pages and static files (docs/console.md), which are HTML, JS, CSS and SVG by nature.
NOT_JSON = {"/metrics": {"text/plain"}}
CONSOLE_TYPES = {"text/html", "text/javascript", "application/javascript", "text/css", "image/svg+xml"}


def _callers(issuers):
    return {
        "anonymous": {},
        "workload": issuers["spire"].bearer(AGENT),
        "operator": issuers["sso"].bearer("sre-sam@example.com", groups=["sre"]),
        "approver": issuers["sso"].bearer("dba-dana@example.com", groups=["dba"]),
    }


def _concrete(rule):
    """A path for `rule`, with a fresh UUID or a plain word for each variable part."""
    values = {}
    for name, converter in rule._converters.items():
        values[name] = uuid.uuid4() if type(converter).__name__ == "UUIDConverter" else "console.js"
    return rule.rule if not values else rule.build(values, append_unknown=False)[1]


def _paths(app):
    return sorted({_concrete(rule) for rule in app.url_map.iter_rules()})


def test_every_answer_of_every_route_and_method_is_json_or_empty(app, client, issuers):
    paths = _paths(app)
    assert {"/task/start", "/leases", "/approvals", "/audit", "/openapi.json"} <= set(paths)
    seen = set()
    for who, headers in _callers(issuers).items():
        for path in paths:
            for method in METHODS:
                body = (
                    {"data": b"{}", "content_type": "application/json"}
                    if method in ("POST", "PUT", "PATCH")
                    else {}
                )
                response = client.open(path, method=method, headers=headers, **body)
                where = f"{who} {method} {path} -> {response.status_code} {response.content_type}"
                seen.add(response.status_code)
                if method == "OPTIONS":
                    assert response.status_code == 204, where
                    assert not response.data and "Content-Type" not in response.headers, where
                    assert "OPTIONS" in response.headers["Allow"], where
                    continue
                if path.startswith("/console") and response.status_code in (200, 308):
                    # The console's pages (and its /console -> /console/ redirect) are HTML.
                    assert response.mimetype in CONSOLE_TYPES, where
                    continue
                if path in NOT_JSON and response.status_code == 200:
                    assert response.mimetype in NOT_JSON[path], where
                    continue
                assert response.mimetype in JSON_TYPES, where
                assert "html" not in response.content_type, where
                if method != "HEAD":
                    json.loads(response.data)
                if response.status_code >= 400:
                    assert response.mimetype == "application/problem+json", where
    # The sweep went through authentication, routing, method and body errors and successes.
    assert {200, 204, 400, 401, 403, 404, 405} <= seen


def test_options_answers_204_with_allow_and_an_unknown_path_404(client):
    answer = client.options("/task/start")
    assert answer.status_code == 204 and answer.data == b""
    assert set(answer.headers["Allow"].split(", ")) == {"POST", "OPTIONS"}
    assert "Content-Type" not in answer.headers
    listed = client.options("/leases")
    assert set(listed.headers["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS"}
    unknown = client.options("/nope")
    assert unknown.status_code == 404 and unknown.mimetype == "application/problem+json"


# ---- limit on every list: the documented answer (docs/api.md#paging) ------------------------

LISTS = {"/leases": "operator", "/tasks": "operator", "/audit": "operator", "/approvals": "approver"}


@pytest.mark.parametrize("path", list(LISTS))
@pytest.mark.parametrize(
    ("limit", "status"),
    [("1", 200), ("500", 200), ("501", 200), (str(10**6), 200), ("9" * 5000, 200),
     ("0", 400), ("-1", 400), ("abc", 400), ("+5", 400), (" 5", 400), ("5.0", 400), ("1_000", 400), ("", 400)],
)  # fmt: skip
def test_every_list_takes_limit_as_documented(client, issuers, path, limit, status):
    response = client.get(path, query_string={"limit": limit}, headers=_callers(issuers)[LISTS[path]])
    assert response.status_code == status, response.get_data(as_text=True)
    if status == 400:
        problem = response.get_json()
        assert problem["code"] == "validation_error"
        assert problem["detail"].startswith("'limit': must be a whole number of 1 or more")
    else:
        assert set(response.get_json()) == {"items", "next_cursor"}


def _limits_sent(engine):
    """The LIMIT values of the SELECTs run while the context is open."""
    sent: list[int] = []

    def spy(_conn, _cursor, statement, parameters, _context, _many):
        if " LIMIT " in statement and isinstance(parameters, dict):
            sent.extend(
                value
                for key, value in parameters.items()
                if key.startswith("param_") and isinstance(value, int)
            )

    event.listen(engine, "before_cursor_execute", spy)
    return sent, lambda: event.remove(engine, "before_cursor_execute", spy)


@pytest.mark.parametrize("path", ["/leases", "/tasks", "/audit"])
@pytest.mark.parametrize(
    ("limit", "page"), [("1", 1), ("500", 500), ("501", 500), (str(10**6), 500), (None, 100)]
)
def test_the_page_size_reaching_the_database_is_capped(client, issuers, services, path, limit, page):
    # One row more than the page is read, to know whether there is a next page.
    sent, stop = _limits_sent(services.engine)
    try:
        query = {"limit": limit} if limit else {}
        assert client.get(path, query_string=query, headers=_callers(issuers)["operator"]).status_code == 200
    finally:
        stop()
    assert sent == [page + 1]


def test_the_api_document_says_what_limit_does():
    from broker.api.openapi import document

    paths = document()["paths"]
    for path in LISTS:
        [limit] = [p for p in paths[path]["get"]["parameters"] if p["name"] == "limit"]
        assert limit["schema"] == {"type": "integer", "minimum": 1, "default": 100}
        assert "above 500 are read as 500" in limit["description"]
