"""Token sources: files re-read, env, auto-detection order, GitHub's OIDC endpoint for real."""

from __future__ import annotations

import importlib.util
import uuid

import pytest

from broker.client import BrokerClient, TokenSourceError
from broker.client.tokens import (
    EnvTokenSource,
    FileTokenSource,
    GitHubActionsTokenSource,
    GitLabTokenSource,
    SpiffeTokenSource,
    resolve_token_source,
)
from tests.client.fakes import fake_server, github_oidc
from tests.factories import can_log_in

GITHUB_ENV = {"ACTIONS_ID_TOKEN_REQUEST_TOKEN": "runner-request-token"}


def test_a_token_file_is_read_again_on_every_use(tmp_path):
    path = tmp_path / "token"
    path.write_text("first\n")
    source = FileTokenSource(path)
    assert source.get() == "first"
    path.write_text("second")  # kubelet or spiffe-helper rotated it
    assert source.get() == "second"
    path.unlink()
    with pytest.raises(TokenSourceError, match="cannot read the token file"):
        source.get()


def test_env_and_gitlab_sources_name_the_variable_not_its_value():
    assert EnvTokenSource(environ={"BROKER_WORKLOAD_TOKEN": " jwt \n"}).get() == "jwt"
    with pytest.raises(TokenSourceError, match=r"\$BROKER_WORKLOAD_TOKEN"):
        EnvTokenSource(environ={}).get()
    assert GitLabTokenSource(environ={"BROKER_ID_TOKEN": "jwt"}).get() == "jwt"
    with pytest.raises(TokenSourceError, match="id_tokens"):
        GitLabTokenSource("MY_TOKEN", environ={}).get()


@pytest.mark.parametrize(
    ("environ", "token_file", "expected"),
    [
        ({"BROKER_WORKLOAD_TOKEN": "x", "SPIFFE_ENDPOINT_SOCKET": "unix:///s"}, "/tok", FileTokenSource),
        ({"BROKER_TOKEN_FILE": "/tok", "BROKER_WORKLOAD_TOKEN": "x"}, None, FileTokenSource),
        (
            {"BROKER_WORKLOAD_TOKEN": "x", "SPIFFE_ENDPOINT_SOCKET": "unix:///s", "BROKER_ID_TOKEN": "y"},
            None,
            EnvTokenSource,
        ),
        (
            {"SPIFFE_ENDPOINT_SOCKET": "unix:///s", "ACTIONS_ID_TOKEN_REQUEST_URL": "u", **GITHUB_ENV},
            None,
            SpiffeTokenSource,
        ),
        (
            {"ACTIONS_ID_TOKEN_REQUEST_URL": "u", **GITHUB_ENV, "BROKER_ID_TOKEN": "y"},
            None,
            GitHubActionsTokenSource,
        ),
        ({"ACTIONS_ID_TOKEN_REQUEST_URL": "u", "BROKER_ID_TOKEN": "y"}, None, GitLabTokenSource),
    ],
    ids=["file-option", "file-env", "env", "spiffe", "github", "gitlab"],
)
def test_auto_detection_order(environ, token_file, expected):
    source = resolve_token_source(None, token_file=token_file, environ=environ)
    assert type(source) is expected


def test_nothing_to_detect_and_bad_names_are_clear_errors():
    with pytest.raises(TokenSourceError, match="no workload token found"):
        resolve_token_source(None, environ={})
    with pytest.raises(TokenSourceError, match="--token-file"):
        resolve_token_source("file", environ={})
    with pytest.raises(TokenSourceError, match="unknown token source"):
        resolve_token_source("vault", environ={})
    github = resolve_token_source("github", audience="aud-x", environ={})
    assert isinstance(github, GitHubActionsTokenSource)  # narrows the TokenSource protocol
    assert github.audience == "aud-x"


@pytest.mark.skipif(importlib.util.find_spec("spiffe") is not None, reason="the spiffe package is installed")
def test_spiffe_without_its_package_says_what_to_install():
    with pytest.raises(TokenSourceError, match=r"credential-broker\[spiffe\]"):
        SpiffeTokenSource().get()


def test_github_source_asks_for_the_audience_with_the_runner_token(issuers):
    ci = issuers["ci"]
    with fake_server(
        github_oidc(lambda audience: ci.mint("repo:acme/app:ref:refs/heads/main", aud=audience))
    ) as (
        url,
        seen,
    ):
        environ = {"ACTIONS_ID_TOKEN_REQUEST_URL": f"{url}/token?api-version=2.0", **GITHUB_ENV}
        token = GitHubActionsTokenSource("credential-broker", environ=environ).get()
    [request] = seen
    assert request.path == "/token"
    assert request.query == {"api-version": ["2.0"], "audience": ["credential-broker"]}
    assert request.headers["authorization"] == "Bearer runner-request-token"
    assert token.count(".") == 2


def test_github_source_without_id_token_permission():
    with pytest.raises(TokenSourceError, match="id-token: write"):
        GitHubActionsTokenSource(environ={}).get()


@pytest.mark.slow
def test_a_github_job_starts_and_finishes_a_task_on_the_real_broker(broker, issuers, stack):
    ci = issuers["ci"]
    # The environment part keeps this test a workload of its own (per-workload limits).
    subject = f"repo:acme/app:environment:test-{uuid.uuid4().hex[:8]}"

    def github_token(audience: str) -> str:
        # What GitHub puts in a main-branch job's token; the test policy binds analytics-read
        # to repo:acme/app on refs/heads/main through `sub` and the `ref` claim.
        return str(
            ci.mint(
                subject,
                aud=audience,
                extra_claims={"ref": "refs/heads/main", "repository": "acme/app", "actor": "alice"},
            )
        )

    with fake_server(github_oidc(github_token)) as (url, seen):
        environ = {"ACTIONS_ID_TOKEN_REQUEST_URL": f"{url}/token?api-version=2.0", **GITHUB_ENV}
        client = BrokerClient(broker.url, resolve_token_source("github", environ=environ))
        answer = client.start(
            "analytics-read", owner="alice@example.com", purpose="github job", context={"environment": "dev"}
        )
        assert answer["workload"] == f"ci:{subject}"
        creds = answer["credentials"]["db"]["data"]
        assert can_log_in(stack, creds)
        client.finish(answer["task_id"])
    assert not can_log_in(stack, creds)
    assert len(seen) == 2  # one fresh token per request
