"""Where a workload's JWT comes from. Each `get()` answers a token that is valid *now*.

Every source is asked again for each request, never cached by the client, because the
tokens rotate under us: a projected Kubernetes token or a spiffe-helper JWT-SVID file is
rewritten in place, GitHub and SPIFFE mint a fresh token per call (which is also what a
`single_use` issuer needs). A source never logs or prints the token, and its errors name
the place it looked, not what it found there.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlencode

import urllib3

from broker.client.errors import TokenSourceError

DEFAULT_AUDIENCE = "credential-broker"
DEFAULT_ENV_VAR = "BROKER_WORKLOAD_TOKEN"
DEFAULT_GITLAB_VAR = "BROKER_ID_TOKEN"
# Auto-detection looks for a token file here when no --token-file is given.
TOKEN_FILE_VAR = "BROKER_TOKEN_FILE"  # noqa: S105 - a variable name, not a token
SOURCE_NAMES = ("file", "env", "spiffe", "github", "gitlab")


@runtime_checkable
class TokenSource(Protocol):
    """Anything that can hand out a current bearer JWT for the broker."""

    def get(self) -> str:
        """A token valid now; raises `TokenSourceError` when none can be had."""
        ...


class StaticTokenSource:
    """One fixed token (what `BrokerClient(url, "eyJ...")` wraps a plain string in)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def get(self) -> str:
        return self._token

    def __repr__(self) -> str:
        return "StaticTokenSource(<token hidden>)"


class FileTokenSource:
    """A file holding the token, read again on every `get()`.

    Kubernetes rewrites a projected service-account token before it expires, and
    spiffe-helper rewrites its JWT-SVID file the same way: reading once would hand the
    broker an expired token an hour into a long task.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def get(self) -> str:
        try:
            token = self.path.read_text(encoding="utf-8").strip()
        except OSError as error:
            raise TokenSourceError(f"cannot read the token file {self.path}: {error.strerror}") from None
        if not token:
            raise TokenSourceError(f"the token file {self.path} is empty")
        return token

    def __repr__(self) -> str:
        return f"FileTokenSource({str(self.path)!r})"


class EnvTokenSource:
    """An environment variable holding the token (read on every `get()`)."""

    def __init__(self, var: str = DEFAULT_ENV_VAR, *, environ: Mapping[str, str] | None = None) -> None:
        self.var = var
        self._environ = environ

    def get(self) -> str:
        environ = os.environ if self._environ is None else self._environ
        token = environ.get(self.var, "").strip()
        if not token:
            raise TokenSourceError(f"${self.var} is not set or empty")
        return token

    def __repr__(self) -> str:
        return f"EnvTokenSource({self.var!r})"


class GitLabTokenSource(EnvTokenSource):
    """The variable a GitLab job's `id_tokens:` section names (default `BROKER_ID_TOKEN`).

    GitLab mints the token when the job starts with the `aud` the job asked for; it is
    not refreshed during the job, so its lifetime (the job's timeout) bounds the task.
    """

    def __init__(self, var: str = DEFAULT_GITLAB_VAR, *, environ: Mapping[str, str] | None = None) -> None:
        super().__init__(var, environ=environ)

    def get(self) -> str:
        try:
            return super().get()
        except TokenSourceError:
            raise TokenSourceError(
                f"${self.var} is not set: declare it in the job, "
                f"`id_tokens: {{{self.var}: {{aud: credential-broker}}}}`"
            ) from None

    def __repr__(self) -> str:
        return f"GitLabTokenSource({self.var!r})"


class GitHubActionsTokenSource:
    """A GitHub Actions OIDC token for `audience`, fetched fresh on every `get()`.

    The runner exposes `ACTIONS_ID_TOKEN_REQUEST_URL` and `..._TOKEN` only to jobs with
    `permissions: id-token: write`. The URL already has a query string, so the audience is
    appended with `&`, as GitHub documents.
    """

    def __init__(
        self,
        audience: str = DEFAULT_AUDIENCE,
        *,
        timeout: float = 10.0,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.audience = audience
        self._timeout = timeout
        self._environ = environ
        self._http = urllib3.PoolManager(retries=urllib3.Retry(total=2, backoff_factor=0.5))

    def get(self) -> str:
        environ = os.environ if self._environ is None else self._environ
        url = environ.get("ACTIONS_ID_TOKEN_REQUEST_URL")
        request_token = environ.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN")
        if not url or not request_token:
            raise TokenSourceError(
                "ACTIONS_ID_TOKEN_REQUEST_URL/_TOKEN are not set: give the job `permissions: id-token: write`"
            )
        separator = "&" if "?" in url else "?"
        try:
            response = self._http.request(
                "GET",
                f"{url}{separator}{urlencode({'audience': self.audience})}",
                headers={"Authorization": f"Bearer {request_token}", "Accept": "application/json"},
                timeout=self._timeout,
            )
        except urllib3.exceptions.HTTPError as error:
            raise TokenSourceError(f"GitHub's OIDC endpoint did not answer: {type(error).__name__}") from None
        if response.status != 200:
            raise TokenSourceError(f"GitHub's OIDC endpoint answered HTTP {response.status}")
        try:
            value = json.loads(response.data)["value"]
        except (ValueError, KeyError, TypeError):
            value = None
        if not isinstance(value, str) or not value:
            raise TokenSourceError("GitHub's OIDC endpoint answered without a token `value`")
        return value

    def __repr__(self) -> str:
        return f"GitHubActionsTokenSource({self.audience!r})"


class SpiffeTokenSource:
    """A JWT-SVID for `audience` from the SPIFFE Workload API (`SPIFFE_ENDPOINT_SOCKET`).

    Uses the optional `spiffe` package (`pip install 'credential-broker[spiffe]'`), imported
    only when a token is first needed so the rest of the client works without it.
    """

    def __init__(self, audience: str = DEFAULT_AUDIENCE, *, socket_path: str | None = None) -> None:
        self.audience = audience
        self.socket_path = socket_path
        self._client: Any = None

    def get(self) -> str:
        client = self._workload_api()
        try:
            svid = client.fetch_jwt_svid(audience={self.audience})
        except Exception as error:  # the package raises its own hierarchy, gRPC errors under it
            raise TokenSourceError(
                f"the SPIFFE Workload API gave no JWT-SVID: {type(error).__name__}"
            ) from None
        token = getattr(svid, "token", None)
        if not isinstance(token, str) or not token:
            raise TokenSourceError("the SPIFFE Workload API answered a JWT-SVID without a token")
        return token

    def _workload_api(self) -> Any:
        if self._client is None:
            try:
                module = importlib.import_module("spiffe.workloadapi.workload_api_client")
            except ImportError:
                raise TokenSourceError(
                    "the SPIFFE token source needs the `spiffe` package: "
                    "pip install 'credential-broker[spiffe]'"
                ) from None
            try:
                self._client = module.WorkloadApiClient(socket_path=self.socket_path)
            except Exception as error:  # a bad or missing socket path
                raise TokenSourceError(f"cannot use the SPIFFE Workload API: {error}") from None
        return self._client

    def __repr__(self) -> str:
        return f"SpiffeTokenSource({self.audience!r})"


def resolve_token_source(
    name: str | None,
    *,
    token_file: str | os.PathLike[str] | None = None,
    audience: str = DEFAULT_AUDIENCE,
    environ: Mapping[str, str] | None = None,
) -> TokenSource:
    """The token source called `name`, or the first one this environment offers.

    Auto-detection (`name=None`) tries, in order: a token file (`token_file`, else
    `$BROKER_TOKEN_FILE`), `$BROKER_WORKLOAD_TOKEN`, the SPIFFE Workload API
    (`$SPIFFE_ENDPOINT_SOCKET`), GitHub Actions OIDC (`$ACTIONS_ID_TOKEN_REQUEST_URL`) and
    GitLab `id_tokens` (`$BROKER_ID_TOKEN`). Explicit configuration comes first, ambient CI
    identity last, so a job can always override what its runner provides.
    """
    env = os.environ if environ is None else environ
    file_path = token_file or env.get(TOKEN_FILE_VAR) or None
    if name is None:
        if file_path:
            name = "file"
        elif env.get(DEFAULT_ENV_VAR):
            name = "env"
        elif env.get("SPIFFE_ENDPOINT_SOCKET"):
            name = "spiffe"
        elif env.get("ACTIONS_ID_TOKEN_REQUEST_URL") and env.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN"):
            name = "github"
        elif env.get(DEFAULT_GITLAB_VAR):
            name = "gitlab"
        else:
            raise TokenSourceError(
                "no workload token found: pass --token-file, or set $BROKER_TOKEN_FILE, "
                "$BROKER_WORKLOAD_TOKEN, $SPIFFE_ENDPOINT_SOCKET, GitHub's id-token permission "
                "or GitLab's id_tokens ($BROKER_ID_TOKEN)"
            )
    if name == "file":
        if not file_path:
            raise TokenSourceError("the file token source needs --token-file PATH (or $BROKER_TOKEN_FILE)")
        return FileTokenSource(file_path)
    if name == "env":
        return EnvTokenSource(environ=environ)
    if name == "spiffe":
        return SpiffeTokenSource(audience, socket_path=env.get("SPIFFE_ENDPOINT_SOCKET"))
    if name == "github":
        return GitHubActionsTokenSource(audience, environ=environ)
    if name == "gitlab":
        return GitLabTokenSource(environ=environ)
    raise TokenSourceError(f"unknown token source {name!r} (expected one of {', '.join(SOURCE_NAMES)})")
