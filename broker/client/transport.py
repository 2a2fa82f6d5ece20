"""The one HTTP layer of `broker.client`, under the SDK and the operator client alike.

A request carries a bearer token asked of the token source at every attempt (so rotated
files and single-use issuers work), sends and answers JSON, and turns an error answer into
the exception of its problem `code` (`errors.from_response`). Each call says how it may be
retried, because that depends on what repeating it would do at the broker:

- `safe`: repeating changes nothing (a GET, a finish, a revoke of one lease), so it is
  retried on connection errors, timeouts, 429 and 503;
- `keyed`: the same, for a start whose every attempt carries one `Idempotency-Key`;
- `once`: an action that must not happen twice (a claim, a decision, the kill switch) is
  retried only when the request never left (connect errors) or the broker said nothing
  happened (429, 503).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal
from urllib.parse import urlencode

import urllib3

from broker.client.errors import BrokerUnreachable, LimitExceeded, Unavailable, from_response
from broker.client.tokens import StaticTokenSource, TokenSource

Retry = Literal["safe", "keyed", "once"]
# A broker that asks for a longer pause than this is treated as down for this call;
# a CLI or an agent loop should not sit silent for minutes on one request.
MAX_RETRY_AFTER = 60.0


class ClientBase:
    """What every client of one broker holds: its URL, a token source and the retry budget.

    `token` is a JWT string or a `TokenSource` (asked again before every request).
    `timeout` bounds each HTTP request; `retries` is how many times a failed request is
    tried again when its `Retry` allows it. `sleep` is how a pause between attempts is taken
    (tests pass a recorder, so the bounds on every pause can be measured without waiting).
    """

    def __init__(
        self,
        url: str,
        token: str | TokenSource,
        *,
        timeout: float,
        retries: int,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not url:
            raise ValueError("the broker URL is empty (set --url or $BROKER_URL)")
        self.url = url.rstrip("/")
        self.tokens: TokenSource = StaticTokenSource(token) if isinstance(token, str) else token
        self.timeout = timeout
        self.retries = max(0, retries)
        # urllib3's own retries are off: which failures may be retried depends on the call.
        self._http = urllib3.PoolManager(retries=False)
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def _call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        *,
        retry: Retry,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, object] | None = None,
    ) -> Any:
        """The answer's JSON (`{}` for an empty one); a `BrokerError` for anything else.

        `params` become the query string (each value as its `str`); those that are None are left out.
        """
        query = {key: value for key, value in (params or {}).items() if value is not None}
        target = self.url + path + (f"?{urlencode(query)}" if query else "")
        payload = None if body is None else json.dumps(body).encode()
        attempt = 0
        while True:
            request_headers = {"Accept": "application/json", **(headers or {})}
            if payload is not None:
                request_headers["Content-Type"] = "application/json"
            request_headers["Authorization"] = f"Bearer {self.tokens.get()}"
            try:
                response = self._http.request(
                    method,
                    target,
                    body=payload,
                    headers=request_headers,
                    timeout=urllib3.Timeout(total=self.timeout),
                    redirect=False,
                )
            except urllib3.exceptions.HTTPError as error:
                if attempt < self.retries and _may_retry_connection_error(error, retry):
                    attempt += 1
                    self._sleep(_backoff(attempt))
                    continue
                # The path only, not the query: filters may name people.
                raise BrokerUnreachable(f"{method} {self.url}{path}: {type(error).__name__}") from None
            if response.status < 400:
                return json.loads(response.data) if response.data else {}
            error_answer = from_response(response.status, response.data, dict(response.headers))
            if attempt < self.retries and isinstance(error_answer, LimitExceeded | Unavailable):
                wait = error_answer.retry_after
                if wait is None or wait <= MAX_RETRY_AFTER:
                    attempt += 1
                    self._sleep(_backoff(attempt) if wait is None else wait)
                    continue
            raise error_answer


def _may_retry_connection_error(error: urllib3.exceptions.HTTPError, retry: Retry) -> bool:
    if retry in ("safe", "keyed"):
        return True
    # An action that may have reached the broker is not repeated: only failures before
    # anything was sent are safe.
    return isinstance(error, urllib3.exceptions.NewConnectionError | urllib3.exceptions.ConnectTimeoutError)


def _backoff(attempt: int) -> float:
    """0.5 s, 1 s, 2 s, ... (capped at 8 s), each with ±20 % jitter."""
    return float(min(8.0, 0.25 * 2**attempt) * random.uniform(0.8, 1.2))  # noqa: S311 - jitter only


__all__ = ["MAX_RETRY_AFTER", "ClientBase", "Retry"]
