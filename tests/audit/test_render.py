"""An audit row reads the same in `GET /audit` and in the export, each in its documented shape."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

from broker.api.render import audit_json
from broker.audit.export import event_json
from broker.models import AuditEvent

TASK = uuid.UUID("11111111-1111-4111-8111-111111111111")
EVENT = uuid.UUID("22222222-2222-4222-8222-222222222222")


def _row(**changes):
    fields = dict(
        seq=7, id=EVENT, at=datetime(2025, 3, 1, 12, 0, 5, tzinfo=UTC), event="task.revoked",
        actor="corp-sso:ops@example.com", task_id=TASK, lease_id=None, owner="alice@example.com",
        purpose="INC-1 test", detail={"reason": "INC-1 test"}, chain_seq=5, prev_hash="a" * 64, hash="b" * 64,
    )  # fmt: skip
    return AuditEvent(**{**fields, **changes})


def test_the_export_line_is_the_documented_schema_in_its_order():
    line = json.dumps(event_json(_row()), separators=(",", ":"), ensure_ascii=False)
    assert line == (
        '{"schema":"credential-broker.audit/v1","id":"22222222-2222-4222-8222-222222222222",'
        '"chain_seq":5,"at":"2025-03-01T12:00:05.000Z","event":"task.revoked",'
        '"actor":"corp-sso:ops@example.com","task_id":"11111111-1111-4111-8111-111111111111",'
        '"lease_id":null,"owner":"alice@example.com","purpose":"INC-1 test",'
        '"detail":{"reason":"INC-1 test"},"prev_hash":"' + "a" * 64 + '","hash":"' + "b" * 64 + '"}'
    )


def test_the_api_row_has_seq_and_sealed_and_no_chain_link():
    assert audit_json(_row()) == {
        "id": str(EVENT), "seq": 7, "at": "2025-03-01T12:00:05.000Z", "event": "task.revoked",
        "actor": "corp-sso:ops@example.com", "task_id": str(TASK), "lease_id": None,
        "owner": "alice@example.com", "purpose": "INC-1 test", "detail": {"reason": "INC-1 test"},
        "sealed": True, "chain_seq": 5, "hash": "b" * 64,
    }  # fmt: skip
    unsealed = audit_json(_row(chain_seq=None, prev_hash=None, hash=None))
    assert unsealed["sealed"] is False and unsealed["chain_seq"] is None and unsealed["hash"] is None
