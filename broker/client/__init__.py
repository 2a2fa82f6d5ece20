"""The broker's client side: an SDK, an operator/approver client, token sources, and `broker exec`.

Importable without the server's dependencies (Flask, SQLAlchemy, gunicorn, psycopg): an
agent or a CI job installs the package and uses only this, over HTTP.

    from broker.client import BrokerClient
    from broker.client.tokens import resolve_token_source

    client = BrokerClient(url, resolve_token_source(None))
    with client.task("analytics-read", owner="alice@example.com", purpose="weekly report",
                     context={"environment": "staging"}) as task:
        connect(task.credentials["db"]["username"], task.credentials["db"]["password"])

`OperatorClient` is the same over the operators' and approvers' endpoints (`broker leases`,
`broker tasks` and `broker approvals` use it).
"""

from broker.client.errors import (
    ApprovalDenied,
    ApprovalTimeout,
    BrokerAPIError,
    BrokerError,
    BrokerUnreachable,
    TokenSourceError,
)
from broker.client.operator import OperatorClient
from broker.client.sdk import ActiveTask, BrokerClient, Credential
from broker.client.tokens import TokenSource, resolve_token_source

__all__ = [
    "ActiveTask",
    "ApprovalDenied",
    "ApprovalTimeout",
    "BrokerAPIError",
    "BrokerClient",
    "BrokerError",
    "BrokerUnreachable",
    "Credential",
    "OperatorClient",
    "TokenSource",
    "TokenSourceError",
    "resolve_token_source",
]
