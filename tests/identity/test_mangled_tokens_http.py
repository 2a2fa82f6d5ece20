"""Every mangled bearer token is a 401 over HTTP (docs/contract.md §3), for each kind of caller."""

from __future__ import annotations

import random

import pytest

from tests.factories import AGENT
from tests.support.tokens import mangled, same_token


@pytest.mark.parametrize(
    ("issuer", "subject", "path"),
    [("spire", AGENT, "/task-types"), ("sso", "sre-sam@example.com", "/leases")],
    ids=["workload", "operator"],
)
def test_every_mangled_token_is_answered_401(client, issuers, issuer, subject, path):
    token = issuers[issuer].mint(subject, groups=["sre"])
    assert client.get(path, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    rng = random.Random(path)
    tried = 0
    while tried < 60:
        candidate = mangled(token, rng)
        if same_token(candidate, token):
            continue
        tried += 1
        answer = client.get(path, headers={"Authorization": f"Bearer {candidate}"})
        assert answer.status_code == 401, (candidate, answer.get_json())
        assert answer.get_json()["code"] == "invalid_token"
