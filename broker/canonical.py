"""JSON values as Postgres gives them back, for everything the broker hashes or MACs.

A `jsonb` column keeps a number as `numeric`: its value, not its spelling. psycopg sends
a Python value as `json.dumps` text and reads a row back as `json.loads` of the text
jsonb prints, so some values come back as others: the float 1e16 (sent as `1e+16`) as
the int 10000000000000000, -0.0 as 0.0. An audit MAC or a request hash taken over the
value as sent would then never match the row as read back, and the row would look
tampered with forever. So every hash over a stored JSON value is taken over
`stored_form(value)`, which the round trip leaves unchanged (docs/security.md, "Audit
log"). The API also refuses the numbers that could not come back as sent at all
(`broker.api.common.json_body`, docs/api.md).
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

# Integers beyond this are not exact in a double, which is how most JSON readers (an
# approver's browser, jq, CEL's double) hold a number: RFC 7493 (I-JSON) §2.2.
MAX_EXACT_INTEGER = 2**53 - 1


def stored_form(value: Any) -> Any:
    """`value` as it reads back from a jsonb column: ints stay ints, a float whose JSON
    text has no digit after the point comes back as an int, and -0.0 as 0.0."""
    # Through the same text psycopg's Jsonb sends: tuples become lists, keys strings.
    return json.loads(json.dumps(value), parse_float=_as_numeric_prints)


def canonical_json(value: Any) -> bytes:
    """The bytes a hash or MAC is taken over: `stored_form`, keys sorted, ASCII only.

    For a value the round trip leaves alone this is the encoding older builds used (they
    hashed the value as sent), so MACs and request hashes written by them still verify.
    """
    return json.dumps(stored_form(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _as_numeric_prints(text: str) -> int | float:
    number = Decimal(text)
    exponent = number.as_tuple().exponent
    if isinstance(exponent, int) and exponent >= 0:
        # numeric keeps the literal's digits after the point (its scale); `1e+16` has
        # none, so it prints as 10000000000000000, which json.loads reads as an int.
        return int(number)
    # numeric has no negative zero: -0.0 prints as 0.0. Any other value prints as its
    # exact decimal, which reads back as the same double.
    return float(text) + 0.0
