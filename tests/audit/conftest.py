"""A broker with an audit key, and what the audit tests share: sealing, raw JSON numbers."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import yaml
from hypothesis import strategies as st

from tests.conftest import broker_config

AUDIT_KEY = "audit-key-for-tests-0123456789abcdef"


@pytest.fixture
def keyed(stack, issuers, policy_file, clean_db) -> Iterator[Any]:
    """Services whose audit chain is HMAC-keyed, as in production."""
    from broker.config import settings_from_mapping
    from broker.services import build_services

    config = broker_config(stack, issuers, policy_file)
    services = build_services(settings_from_mapping(config, env={"BROKER_AUDIT_KEY": AUDIT_KEY}))
    yield services
    services.close()


@pytest.fixture
def keyed_client(keyed) -> Any:
    from broker.app import create_app

    return create_app(services=keyed).test_client()


@pytest.fixture
def keyed_config(tmp_path, stack, issuers, policy_file):
    path = tmp_path / "broker.yaml"
    path.write_text(yaml.safe_dump(broker_config(stack, issuers, policy_file)))
    return path


def seal_all(services) -> int:
    from broker.audit import seal_pending
    from broker.db import unit_of_work

    total = 0
    while True:
        with unit_of_work(services.sessions) as session:
            sealed = seal_pending(session, services.audit_key)
        total += sealed
        if not sealed:
            return total


def verify(services):
    from broker.audit import verify_chain
    from broker.db import unit_of_work

    with unit_of_work(services.sessions) as session:
        return verify_chain(session, services.audit_key)


# -- JSON numbers as a client may write them, as raw text -------------------------------

# Every spelling JSON's grammar allows: sign, leading 0 or digits, fraction, any exponent.
number_grammar = st.from_regex(
    r"-?(0|[1-9][0-9]{0,24})(\.[0-9]{1,24})?([eE][+-]?[0-9]{1,3})?", fullmatch=True
)
# Integers of every size around the exact-double edge and well past 2**63.
integer_text = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=2**53 - 3, max_value=2**53 + 3),
    st.integers(min_value=-(2**53) - 3, max_value=-(2**53) + 3),
).map(str)
# Every double, in the spellings a serializer picks: shortest, exponent, exact expansion.
double_text = (
    st.floats(allow_nan=False, allow_infinity=False)
    .flatmap(
        lambda value: st.sampled_from(
            [repr(value), f"{value:e}", f"{value:E}", f"{value:.25g}", str(Decimal(value))]
        )
    )
    .filter(lambda text: "inf" not in text.lower() and "nan" not in text.lower())
)
known_forms = st.sampled_from([
    "1E2", "1e2", "1.0", "100000000000000000000000", "0.1e1", "1.5e-7", "-0", "-0.0", "0.0", "1e400",
    "-1e400", "1e-400", "0.1", "0.30000000000000004", "12345678901234567890.5", "9223372036854775808",
    "18446744073709551616", "1e16", "1e+16", "9007199254740991", "9007199254740992", "-9007199254740991",
    "3.141592653589793238462643383279", "1.00000000000000000001", "5e-324", "1.7976931348623157e308",
])  # fmt: skip
number_text = st.one_of(number_grammar, integer_text, double_text, known_forms)

_keys = st.text(alphabet="abcdefghij", min_size=1, max_size=6).map(lambda key: f"k{key}")


def _object(members: dict[str, str]) -> str:
    return "{" + ",".join(f'"{key}":{value}' for key, value in members.items()) + "}"


# Nested objects and arrays whose leaves are raw number text (and the odd string or
# literal): the JSON text of a context value.
json_text = st.recursive(
    number_text | st.sampled_from(['"x"', "true", "null"]),
    lambda children: (
        st.lists(children, max_size=3).map(lambda items: "[" + ",".join(items) + "]")
        | st.dictionaries(_keys, children, max_size=3).map(_object)
    ),
    max_leaves=8,
)
