"""GET /task-types: each workload sees the task types it may start, and no Vault details."""

from __future__ import annotations

import yaml

from tests.factories import AGENT

CI_MAIN = "repo:acme/app:ref:refs/heads/main"


def names(response):
    return [item["name"] for item in response.get_json()["items"]]


def test_a_spiffe_agent_sees_every_type_granted_to_it_with_its_shape(client, issuers):
    response = client.get("/task-types", headers=issuers["spire"].bearer(AGENT))
    assert response.status_code == 200
    assert names(response) == ["analytics-read", "deploy-prod", "everything", "half-broken", "short"]
    by_name = {item["name"]: item for item in response.get_json()["items"]}
    assert by_name["analytics-read"] == {
        "name": "analytics-read",
        "description": "Read the analytics database",
        "ttl": {"default": 300, "max": 900},
        "approval": "never",
        "approver_groups": [],
        "credentials": [{"name": "db", "kind": "database"}],
    }
    assert by_name["deploy-prod"]["approval"] == "conditional"
    assert by_name["deploy-prod"]["approver_groups"] == ["dba"]
    assert by_name["everything"]["credentials"] == [
        {"name": "cert", "kind": "pki"},
        {"name": "db", "kind": "database"},
        {"name": "rw", "kind": "lease"},
        {"name": "token", "kind": "vault_token"},
    ]


def test_a_ci_workload_sees_only_the_types_its_claims_match(client, issuers):
    main = client.get(
        "/task-types", headers=issuers["ci"].bearer(CI_MAIN, extra_claims={"ref": "refs/heads/main"})
    )
    assert names(main) == ["analytics-read"]
    branch = client.get(
        "/task-types", headers=issuers["ci"].bearer(CI_MAIN, extra_claims={"ref": "refs/heads/dev"})
    )
    assert branch.status_code == 200
    assert names(branch) == []


def test_a_subject_outside_every_glob_gets_an_empty_list(client, issuers):
    response = client.get(
        "/task-types", headers=issuers["spire"].bearer("spiffe://example.org/agents/team/x")
    )
    assert response.status_code == 200
    assert response.get_json() == {"items": []}


def test_no_mount_role_path_or_policy_name_appears(client, issuers, policy_file):
    policy = yaml.safe_load(policy_file.read_text())
    hidden = {"broker-task-"}
    for task in policy["tasks"].values():
        for spec in task["credentials"].values():
            for key in ("mount", "role", "path", "common_name"):
                if key in spec:
                    hidden.add(spec[key])
            hidden.update(spec.get("policies", []))
        hidden.update(task["owners"])
        hidden.update(task.get("when", []))
        if "approval" in task:
            hidden.add(task["approval"]["required_when"])
    # The default mount `database` is also the kind's name, which the answer does carry.
    hidden -= {"database", "pki"}
    text = client.get("/task-types", headers=issuers["spire"].bearer(AGENT)).get_data(as_text=True)
    assert "analytics-ro" in yaml.safe_dump(policy)  # the search below looks for real names
    assert [value for value in hidden if value in text] == []
    assert '"mount"' not in text and '"role"' not in text and '"path"' not in text


def test_without_a_token_it_is_401(client):
    response = client.get("/task-types")
    assert response.status_code == 401
    assert response.get_json()["code"] == "invalid_token"


def test_an_approver_only_token_is_403(client, issuers):
    response = client.get(
        "/task-types", headers=issuers["sso"].bearer("dba-dana@example.com", groups=["dba"])
    )
    assert response.status_code == 403
    assert response.get_json()["code"] == "forbidden"


def test_an_unknown_query_parameter_is_refused(client, issuers):
    response = client.get("/task-types?task=x", headers=issuers["spire"].bearer(AGENT))
    assert response.status_code == 400
    assert response.get_json()["code"] == "validation_error"


def test_the_openapi_document_describes_it(client):
    document = client.get("/openapi.json").get_json()
    assert "get" in document["paths"]["/task-types"]
    assert "TaskTypeList" in document["components"]["schemas"]
