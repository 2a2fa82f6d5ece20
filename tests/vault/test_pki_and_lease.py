"""PKI certificates and arbitrary lease paths."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from broker.credentials import LeaseCredential, PkiCredential
from broker.vault import VaultRejected
from broker.vault.policies import workload_label

WORKLOAD = "spiffe://example.org/agents/A_1"
CERT = PkiCredential(
    kind="pki",
    role="agents",
    common_name="{task_id}.agents.example.org",
    alt_names=["{workload}.agents.example.org"],
)


def test_pki_certificate_is_issued_and_its_lease_revokes_it(gateway, start_task, root):
    task = start_task({"cert": CERT})
    secret = gateway.issue(task.token, CERT, ttl_seconds=90, task_id=task.task_id, workload=WORKLOAD)

    cert = x509.load_pem_x509_certificate(secret.data["certificate"].encode())
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert cn == f"{task.task_id}.agents.example.org"
    assert f"{workload_label(WORKLOAD)}.agents.example.org" in sans.get_values_for_type(x509.DNSName)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.total_seconds() <= 90 + 30  # ttl, plus the role's 30 s not_before backdate
    assert "PRIVATE KEY" in secret.data["private_key"]
    assert secret.handle.kind == "lease"
    assert secret.handle.ref.startswith("pki/issue/agents/")

    serial = secret.data["serial_number"]
    assert root.call("GET", f"pki/cert/{serial}")["data"]["revocation_time"] == 0
    gateway.revoke(secret.handle)
    assert not root.lease_exists(secret.handle.ref)
    assert root.call("GET", f"pki/cert/{serial}")["data"]["revocation_time"] > 0


def test_pki_name_outside_the_role_is_rejected(gateway, start_task):
    spec = PkiCredential(kind="pki", role="agents", common_name="{task_id}.evil.example.com")
    task = start_task({"cert": spec}, task="vault-test-evil")
    with pytest.raises(VaultRejected) as caught:
        gateway.issue(task.token, spec, ttl_seconds=60, task_id=task.task_id, workload="w")
    assert "evil" not in str(caught.value)


def test_lease_kind_on_a_database_path(gateway, start_task, pg, root):
    spec = LeaseCredential(kind="lease", path="database/creds/analytics-ro")
    task = start_task({"db": spec}, task="vault-test-lease")
    secret = gateway.issue(task.token, spec, ttl_seconds=60, task_id=task.task_id, workload="w")

    assert secret.handle.kind == "lease"
    assert pg.can_login(secret.data["username"], secret.data["password"])
    gateway.revoke(secret.handle)
    assert not pg.can_login(secret.data["username"], secret.data["password"])
    assert not root.lease_exists(secret.handle.ref)


def test_lease_kind_write_with_params(gateway, start_task):
    spec = LeaseCredential(
        kind="lease",
        path="pki/issue/agents",
        method="write",
        params={"common_name": "writer.agents.example.org", "ttl": "60s"},
    )
    task = start_task({"cert": spec}, task="vault-test-lease-write")
    secret = gateway.issue(task.token, spec, ttl_seconds=60, task_id=task.task_id, workload="w")
    assert secret.handle.kind == "lease"
    assert "certificate" in secret.data
    gateway.revoke(secret.handle)
