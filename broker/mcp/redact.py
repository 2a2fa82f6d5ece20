"""Replace secret values, and the usual ways a program re-encodes them, in text for the model.

A command run with credentials may print them, on purpose or not: `env`, a debug log, a
connection URL (percent-encoded), an `Authorization: Basic` header (base64 of `user:pass`),
a hex dump. Each secret is therefore looked for as itself and as:

- base64, standard and URL-safe alphabets, with and without `=` padding;
- the same inside a longer base64 text (`base64("user:" + password)`): for each of the
  three byte alignments, the run of characters that depends on the secret alone;
- percent-encoding (`quote`, `quote_plus`, upper- and lower-case hex digits);
- hex, upper- and lower-case.

Every match becomes `[REDACTED:<credential name>]`. What is not caught: other encodings
(base32, gzip, a cipher), a secret split across writes with other bytes between, and
values shorter than `MIN_SECRET_LENGTH` (no engine issues secrets that short; redacting
`ec` everywhere would garble the output for nothing).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, quote_plus

from broker.client.env import secret_values

MIN_SECRET_LENGTH = 4
# A shorter base64 fragment of a secret says little and would match ordinary text.
MIN_FRAGMENT_LENGTH = 8


def encodings(value: str) -> set[str]:
    """`value` and every encoded form of it this module looks for."""
    raw = value.encode()
    forms = {value, raw.hex(), raw.hex().upper()}
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        whole = encode(raw).decode()
        forms |= {whole, whole.rstrip("=")}
        forms |= _aligned_fragments(raw, encode)
    for percent in (quote(value, safe=""), quote_plus(value, safe=""), quote(value)):
        forms |= {percent, re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), percent)}
    return {form for form in forms if form}


def _aligned_fragments(raw: bytes, encode: Any) -> set[str]:
    """The characters of `encode(prefix + raw + suffix)` fixed by `raw` alone, per alignment."""
    fragments = set()
    for offset in range(3):
        text = encode(b"\0" * offset + raw).decode().rstrip("=")
        # Characters carry 6 bits: skip those mixing prefix bits, and a last one mixing suffix bits.
        first = -(-8 * offset // 6)
        last = 8 * (offset + len(raw)) // 6
        fragment = text[first:last]
        if len(fragment) >= MIN_FRAGMENT_LENGTH:
            fragments.add(fragment)
    return fragments


class Redactor:
    """Redacts the secrets of some credentials (name -> {kind, data, ...}) from text."""

    def __init__(self, credentials_by_task: Iterable[Mapping[str, Any]] = ()) -> None:
        labels: dict[str, str] = {}
        for credentials in credentials_by_task:
            for name, credential in credentials.items():
                for value in secret_values({name: credential}):
                    if len(value) < MIN_SECRET_LENGTH:
                        continue
                    for form in encodings(value):
                        labels.setdefault(form, name)
        self._labels = labels
        # Longest first, so a whole encoding wins over a fragment of it at the same place.
        ordered = sorted(labels, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        self.longest = len(ordered[0]) if ordered else 0

    def __call__(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda match: f"[REDACTED:{self._labels[match.group(0)]}]", text)

    def trim_partial_tail(self, text: str) -> str:
        """Cut the start of a secret (of any encoding) left at the end of truncated text."""
        for form, name in self._labels.items():
            for length in range(min(len(form) - 1, len(text)), MIN_SECRET_LENGTH - 1, -1):
                if text.endswith(form[:length]):
                    return text[:-length] + f"[REDACTED:{name}]"
        return text
