"""One namespace of workload ids: two configured issuers never produce the same id."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from broker.config import ConfigError, IssuerSettings, settings_from_mapping
from broker.identity.ids import check_namespace, workload_id
from broker.identity.spiffe import parse_spiffe_id
from tests.test_config import BASE, with_changes


def _issuer(name: str, kind: str = "oidc", trust_domain: str | None = None, n: int = 0) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": name,
        "issuer": f"https://issuer-{n}.test",
        "jwks_file": "/k.json",
        "audiences": ["credential-broker"],
        "kind": kind,
        "use": "workload",
    }
    if trust_domain is not None:
        entry["trust_domain"] = trust_domain
    return entry


@pytest.mark.parametrize(
    "name",
    ["spiffe", "https", "urn", "Corp-SSO", "corp.sso", "corp_sso", "corp:sso", "-ci", "9ci", "", "a" * 64],
)
def test_an_issuer_name_that_could_collide_is_refused(name):
    with pytest.raises(ConfigError) as raised:
        settings_from_mapping(with_changes(issuers__0__name=name), env={})
    assert "issuers.0.name" in str(raised.value)


def test_issuer_names_are_unique():
    config = with_changes()
    config["issuers"].append(_issuer("spire", n=1))
    with pytest.raises(ConfigError, match="issuer names must be unique"):
        settings_from_mapping(config, env={})


def test_one_spiffe_issuer_per_trust_domain():
    config = with_changes()
    config["issuers"].append(_issuer("spire-b", kind="spiffe", trust_domain="example.org", n=1))
    with pytest.raises(ConfigError, match="one spiffe issuer per trust domain"):
        settings_from_mapping(config, env={})
    config["issuers"][1]["trust_domain"] = "other.example.org"
    assert len(settings_from_mapping(config, env={}).issuers) == 2


def test_the_documented_ids_stay_as_they_were():
    spire = IssuerSettings.model_validate(_issuer("spire", "spiffe", "example.org"))
    ci = IssuerSettings.model_validate(_issuer("ci", n=1))
    assert workload_id(spire, "spiffe://example.org/agents/x") == "spiffe://example.org/agents/x"
    assert workload_id(ci, "repo:acme/app:ref:refs/heads/main") == "ci:repo:acme/app:ref:refs/heads/main"


def test_the_verifier_rechecks_the_namespace():
    raw = [_issuer("spire", "spiffe", "example.org"), _issuer("spire-b", "spiffe", "example.org", n=1)]
    with pytest.raises(ValueError, match="trust domain"):
        check_namespace([IssuerSettings.model_validate(entry) for entry in raw])
    reserved = IssuerSettings.model_construct(**{**_issuer("ci"), "name": "spiffe"})
    with pytest.raises(ValueError, match="collide"):
        check_namespace([reserved])


# -- property: any two valid issuers, any two subjects -------------------------------------

# Reserved names included: the config must refuse them, or the property fails.
_names = st.one_of(
    st.sampled_from(["spiffe", "https", "ci"]), st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True)
)
_domains = st.from_regex(r"[a-z0-9][a-z0-9.-]{0,15}", fullmatch=True)
_paths = st.lists(st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True), min_size=1, max_size=3)
_oidc_subjects = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=30)


@st.composite
def _issuer_and_subject(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    if draw(st.booleans()):
        domain = draw(_domains)
        return _issuer(draw(_names), "spiffe", domain), f"spiffe://{domain}/{'/'.join(draw(_paths))}"
    return _issuer(draw(_names)), draw(_oidc_subjects)


@st.composite
def _rival(draw: st.DrawFn, first: tuple[dict[str, Any], str]) -> tuple[dict[str, Any], str]:
    """A second issuer and subject, often built to aim at the first one's id."""
    issuer, subject = first
    target = subject if issuer["kind"] == "spiffe" else f"{issuer['name']}:{subject}"
    scheme = target.partition(":")[0]
    if draw(st.booleans()):
        return draw(_issuer_and_subject())
    if draw(st.booleans()):
        # An OIDC issuer named like the id's prefix, with the rest of the id as its subject.
        name = draw(st.sampled_from([scheme, issuer["name"]]))
        rest = target[len(name) + 1 :] if target.startswith(f"{name}:") else draw(_oidc_subjects)
        return _issuer(name, n=1), rest or "x"
    # A SPIFFE issuer for the same trust domain (or one spelled alike), and the same ID.
    domain = draw(st.sampled_from([issuer.get("trust_domain") or "example.org", "example.org"]))
    same = subject if subject.startswith(f"spiffe://{domain}/") else f"spiffe://{domain}/agents/x"
    return _issuer(draw(_names), "spiffe", domain, n=1), same


@given(st.data())
def test_two_configured_issuers_never_produce_equal_ids(data):
    a, sub_a = first = data.draw(_issuer_and_subject())
    b, sub_b = data.draw(_rival(first))
    b["issuer"] = "https://issuer-b.test"
    try:
        settings = settings_from_mapping({**BASE, "issuers": [a, b]}, env={})
    except ConfigError:
        # The config refuses this pair (a reserved name, one name or one trust domain
        # twice): such a broker never starts, so it never gives out an id.
        assume(False)
    issuer_a, issuer_b = settings.issuers
    for issuer, sub in ((issuer_a, sub_a), (issuer_b, sub_b)):
        if issuer.kind == "spiffe":
            assert issuer.trust_domain is not None
            parse_spiffe_id(sub, issuer.trust_domain)
    id_a, id_b = workload_id(issuer_a, sub_a), workload_id(issuer_b, sub_b)
    assert id_a != id_b
    assert id_a.casefold() != id_b.casefold()  # approvals compare ids case-insensitively


def test_the_old_collision_spiffe_named_oidc_issuer_is_refused():
    config = with_changes()
    config["issuers"].append(_issuer("spiffe", n=1))
    with pytest.raises(ConfigError, match="reserved"):
        settings_from_mapping(config, env={})
