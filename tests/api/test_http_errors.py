"""Every error is application/problem+json with a stable code, never a stack trace."""

from __future__ import annotations

import pytest

AGENT = "spiffe://example.org/agents/reporter"


def assert_problem(response, status, code):
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert body["code"] == code
    assert body["status"] == status
    assert set(body) >= {"type", "title", "status", "detail", "code"}
    assert "Traceback" not in response.get_data(as_text=True)
    return body


def test_unknown_path_is_a_json_404(client):
    assert_problem(client.get("/nope"), 404, "not_found")


def test_wrong_method_is_a_json_405_with_allow(client):
    response = client.put("/task/start")
    assert_problem(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


def test_oversized_body_is_413(client, issuers):
    big = {"task": "analytics-read", "owner": "a@example.com", "purpose": "x" * 70000}
    response = client.post("/task/start", json=big, headers=issuers["spire"].bearer(AGENT))
    assert_problem(response, 413, "body_too_large")


def test_oversized_body_is_refused_before_authentication(client):
    response = client.post("/task/start", data=b"{" + b" " * 70000 + b"}", content_type="application/json")
    assert response.status_code in (401, 413)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"task": "analytics-read", "task": "other"}', "duplicate keys"),
        (b'{"task": "analytics-read", "owner": "a@example.com", "purpose": "short"}', "purpose"),
        (
            b'{"task": "analytics-read", "owner": "a@example.com", "purpose": "long enough", "policies": ["root"]}',
            "unknown field 'policies'",
        ),
        (b'{"task": "analytics-read", "owner": ["a"], "purpose": "long enough"}', "owner"),
        (
            b'{"task": "analytics-read", "owner": "a@example.com", "purpose": "long enough", "ttl_seconds": 0}',
            "ttl_seconds",
        ),
        (
            b'{"task": "analytics-read", "owner": "a@example.com", "purpose": "long enough", "ttl_seconds": "60"}',
            "ttl_seconds",
        ),
        (b'{"task": "analytics-read", "owner": "a\\u0000b", "purpose": "long enough"}', "owner"),
        (b'{"task": "analytics-read", "owner": "a@example.com", "purpose": "evil \\u202e text"}', "purpose"),
        (b'{"task": "analytics-read", "owner": "' + b"o" * 201 + b'", "purpose": "long enough"}', "owner"),
    ],
    ids=[
        "malformed",
        "array",
        "duplicate-key",
        "short-purpose",
        "unknown-field",
        "owner-list",
        "ttl-zero",
        "ttl-string",
        "nul",
        "bidi",
        "owner-too-long",
    ],
)
def test_bad_bodies_are_400_validation_error(client, issuers, body, fragment):
    response = client.post(
        "/task/start", data=body, content_type="application/json", headers=issuers["spire"].bearer(AGENT)
    )
    problem = assert_problem(response, 400, "validation_error")
    assert fragment in problem["detail"]


def test_non_json_content_type_is_415(client, issuers):
    response = client.post(
        "/task/start",
        data="task=x",
        headers=issuers["spire"].bearer(AGENT),
        content_type="application/x-www-form-urlencoded",
    )
    assert_problem(response, 415, "unsupported_media_type")


def test_missing_token_is_401_with_www_authenticate(client):
    response = client.post("/task/start", json={})
    assert_problem(response, 401, "invalid_token")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_body_without_content_type_is_read_as_json(client, issuers):
    import json

    body = json.dumps({"task": "analytics-read", "owner": "a@example.com", "purpose": "short"})
    response = client.post("/task/start", data=body, headers=issuers["spire"].bearer(AGENT))
    problem = assert_problem(response, 400, "validation_error")
    assert "purpose" in problem["detail"]


@pytest.mark.parametrize(
    "body",
    [
        b'{"task": "analytics-read", "owner": "a@example.com", "purpose": "long enough", "context": {"x\\u0000": "a"}}',
        b'{"task": "analytics-read", "owner": "a@example.com", "purpose": "long enough", "context": {"x": "a\\u0000b"}}',
        b'{"task": "analytics-read", "owner": "a@example.com", "purpose": "long enough", "context": {"x": NaN}}',
        b'{"task": "analytics-read", "owner": "a@example.com", "purpose": "long enough", "context": {"x": Infinity}}',
        b'{"task": "analytics-read", "owner": "a@example.com", "purpose": "long enough", "context": {"x": 1e999}}',
        b'{"task": "analytics-read", "owner": "a@example.com", "purpose": "long enough", "context": '
        + b'{"a":' * 5000
        + b"1"
        + b"}" * 5001,
        b'{"task": "analytics-read", "owner": "a@example.com", "purpose": "long enough", "context": {"a": '
        + b"[" * 1500
        + b"]" * 1500
        + b"}}",
    ],
    ids=["nul-in-key", "nul-in-value", "nan", "infinity", "overflow", "deep-objects", "deep-arrays"],
)
def test_hostile_context_is_400_not_500(client, issuers, body):
    response = client.post(
        "/task/start", data=body, content_type="application/json", headers=issuers["spire"].bearer(AGENT)
    )
    assert_problem(response, 400, "validation_error")


def test_a_chunked_body_over_the_limit_is_413(client, issuers):
    import io
    import json

    body = json.dumps({"task": "analytics-read", "owner": "a@example.com", "purpose": "x" * 200_000}).encode()

    response = client.post(
        "/task/start",
        input_stream=io.BytesIO(body),
        content_type="application/json",
        headers={**issuers["spire"].bearer(AGENT), "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert_problem(response, 413, "body_too_large")


@pytest.mark.parametrize("path", ["/tasks?owner=a%00b", "/leases?workload=a%00b", "/audit?owner=a%00b"])
def test_nul_in_a_query_is_400(client, issuers, path):
    operator = issuers["sso"].bearer("sre-sam@example.com", groups=["sre"])
    assert_problem(client.get(path, headers=operator), 400, "validation_error")


@pytest.mark.parametrize(
    ("method", "path"), [("get", "/task/start"), ("get", "/task/finish"), ("get", "/leases/revoke")]
)
def test_fixed_paths_are_not_mistaken_for_ids(client, method, path):
    response = getattr(client, method)(path)
    assert_problem(response, 405, "method_not_allowed")
    assert "GET" not in response.headers["Allow"]


class _FailingStream:
    """A wsgi.input whose decoder gives up, as gunicorn's does on a broken chunked body."""

    def __init__(self, error):
        self.error = error

    def read(self, *_args):
        raise self.error


def _chunked_post(client, issuers, stream):
    return client.post(
        "/task/start",
        headers={
            **issuers["spire"].bearer(AGENT),
            "Content-Type": "application/json",
            "Transfer-Encoding": "chunked",
        },
        environ_overrides={"wsgi.input": stream, "wsgi.input_terminated": True},
    )


def _gunicorn_errors():
    from gunicorn.http.errors import (
        ChunkMissingTerminator,
        InvalidChunkExtension,
        InvalidChunkSize,
        NoMoreData,
    )

    return [
        pytest.param(InvalidChunkSize(b"zz"), id="bad-size"),
        pytest.param(ChunkMissingTerminator(b"XX"), id="missing-crlf"),
        pytest.param(NoMoreData(b""), id="truncated"),
        pytest.param(InvalidChunkExtension("invalid chunk extension"), id="extension-junk"),
    ]


@pytest.mark.parametrize("error", _gunicorn_errors())
def test_a_chunked_body_gunicorn_cannot_decode_is_400_bad_request(client, issuers, error):
    problem = assert_problem(_chunked_post(client, issuers, _FailingStream(error)), 400, "bad_request")
    assert "chunked" in problem["detail"]
    assert "zz" not in problem["detail"] and "XX" not in problem["detail"]  # no parser text


@pytest.mark.parametrize(
    "raw",
    [b"zz\r\n{}\r\n0\r\n\r\n", b"-2\r\n{}\r\n0\r\n\r\n", b"2;\x01junk-that-is-not-hex\r\n{}\r\n0\r\n\r\n"],
    ids=["bad-size", "negative-size", "extension-junk"],
)
def test_a_chunked_body_werkzeugs_decoder_refuses_is_400_bad_request(client, issuers, raw):
    import io

    from werkzeug.serving import DechunkedInput

    # As its base class: werkzeug types DechunkedInput.readinto narrower than BufferedReader asks.
    dechunked: io.RawIOBase = DechunkedInput(io.BytesIO(raw))
    stream = io.BufferedReader(dechunked)
    assert_problem(_chunked_post(client, issuers, stream), 400, "bad_request")
