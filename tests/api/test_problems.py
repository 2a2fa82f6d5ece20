"""Every domain error a service can raise answers with its own code and title, never a 500."""

from __future__ import annotations

import inspect

import pytest
from flask import Flask

from broker import errors
from broker.api.problems import PROBLEMS, register_error_handlers

DOMAIN_ERRORS = [
    cls
    for _, cls in inspect.getmembers(errors, inspect.isclass)
    if issubclass(cls, errors.BrokerError) and cls is not errors.BrokerError
]


def _raising(error: Exception) -> Flask:
    app = Flask(__name__)
    register_error_handlers(app)

    @app.get("/")
    def fail() -> str:
        raise error

    return app


def _instance(cls: type[errors.BrokerError]) -> errors.BrokerError:
    if cls is errors.TtlExceedsMax:
        return cls(900, 300)
    if cls is errors.UnknownTask:
        return cls("nope")
    if cls is errors.Locked:
        return cls("5d2a7c10-0000-4000-8000-000000000000")
    return cls()


def test_the_domain_errors_were_found():
    assert len(DOMAIN_ERRORS) == 14


@pytest.mark.parametrize("cls", DOMAIN_ERRORS, ids=lambda cls: cls.__name__)
def test_a_domain_error_answers_its_row_with_its_own_title(cls):
    row = PROBLEMS[cls]
    response = _raising(_instance(cls)).test_client().get("/")
    body = response.get_json()
    assert response.status_code == row.status and response.mimetype == "application/problem+json"
    assert body["code"] == row.code and body["title"] == cls.title
