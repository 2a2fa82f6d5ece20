"""The client's exceptions kept level with the server's problem table, code by code."""

from __future__ import annotations

import json

import pytest

from broker.api.problems import PROBLEMS
from broker.client import errors as e

# Only the codes are read from the table: its other columns are the server's business.
SERVER_CODES = sorted({row.code for row in PROBLEMS.values()})


def test_the_server_table_is_read():
    assert {"validation_error", "conflict", "vault_unavailable"} <= set(SERVER_CODES)


def test_every_code_the_server_answers_has_a_class_in_the_client_table():
    assert [code for code in SERVER_CODES if code not in e._BY_CODE] == []


@pytest.mark.parametrize("code", SERVER_CODES)
def test_every_code_the_server_answers_raises_a_specific_class(code):
    # A status the client maps to nothing: the class can only come from the code.
    error = e.from_response(599, json.dumps({"code": code, "detail": "why"}).encode())
    assert type(error) is not e.BrokerAPIError
    assert isinstance(error, e.BrokerAPIError)
    assert (error.code, error.detail) == (code, "why")


def test_a_reused_idempotency_key_names_the_task_it_started():
    body = {"code": "idempotency_key_reused", "detail": "different request", "task_id": "t-1"}
    error = e.from_response(422, json.dumps(body).encode())
    assert isinstance(error, e.IdempotencyKeyReused) and error.task_id == "t-1"
    assert not isinstance(error, e.Conflict)  # the start's lost-answer handling is for 409s only


@pytest.mark.parametrize(("status", "cls"), [(413, e.BodyTooLarge), (415, e.UnsupportedMediaType)])
def test_a_proxys_refusal_of_the_body_is_still_a_request_error(status, cls):
    error = e.from_response(status, b"<html>nginx</html>")
    assert isinstance(error, cls) and isinstance(error, e.ValidationError)
    assert error.code == "http_error" and "nginx" not in str(error)
