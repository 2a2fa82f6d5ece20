"""Hypothesis strategies for people's names and their respellings (tests only).

Look-alike letters are written as escapes on purpose: the point is that they can't be seen.
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import strategies as st

# Characters that render as nothing (or as a space) and so hide a difference.
INVISIBLES = [
    "\u200b",  # zero-width space
    "\u200c",  # zero-width non-joiner
    "\u200d",  # zero-width joiner
    "\u200e",  # left-to-right mark
    "\u200f",  # right-to-left mark
    "\u202e",  # right-to-left override
    "\u2066",  # left-to-right isolate
    "\u2060",  # word joiner
    "\ufeff",  # byte order mark
    "\u00ad",  # soft hyphen
    "\u034f",  # combining grapheme joiner
    "\u115f",  # Hangul choseong filler
    "\u1160",  # Hangul jungseong filler
    "\u3164",  # Hangul filler
    "\uffa0",  # halfwidth Hangul filler
    "\ufe0f",  # variation selector 16
    "\U000e0100",  # variation selector 17
    "\u180e",  # Mongolian vowel separator
    "\u2800",  # braille pattern blank
    "\U000e0041",  # tag latin capital a
]
CONTROLS = ["\t", "\n", "\r", "\x00", "\x0b", "\x1b", "\x7f", "\x85", "\u2028", "\u2029"]
# Cyrillic and Greek letters drawn like these Latin ones.
LOOKALIKES = {
    "a": ["\u0430", "\u03b1"],
    "c": ["\u0441"],
    "e": ["\u0435"],
    "i": ["\u0456"],
    "o": ["\u043e", "\u03bf"],
    "p": ["\u0440", "\u03c1"],
    "x": ["\u0445"],
    "y": ["\u0443"],
}

_local = st.from_regex(r"[a-z][a-z0-9._-]{0,12}", fullmatch=True)


def owners(domain: str | None = None) -> st.SearchStrategy[str]:
    """Plain Latin email-like names, in their normal form."""
    domains = (
        st.just(domain) if domain else st.from_regex(r"[a-z][a-z0-9-]{0,8}\.(com|org|net)", fullmatch=True)
    )
    return st.builds(lambda local, dom: f"{local}@{dom}", _local, domains)


def _fullwidth(char: str) -> str:
    # FF01..FF5E are the fullwidth forms of ASCII 21..7E; NFKC maps them back.
    return chr(ord(char) - 0x21 + 0xFF01) if "!" <= char <= "~" else char


_FORMS: dict[str, Callable[[str], str]] = {
    "same": lambda c: c,
    "upper": str.upper,
    "fullwidth": _fullwidth,
    "fullwidth-upper": lambda c: _fullwidth(c.upper()),
}


@st.composite
def respellings(draw: st.DrawFn, name: str, *, invisible: bool = True, lookalikes: bool = False) -> str:
    """`name` as a person would read it: other case, fullwidth letters, surrounding
    whitespace, and (if asked) invisible characters and look-alike letters."""
    chars = []
    for char in name:
        if lookalikes and char in LOOKALIKES and draw(st.booleans()):
            chars.append(draw(st.sampled_from(LOOKALIKES[char])))
        else:
            chars.append(_FORMS[draw(st.sampled_from(sorted(_FORMS)))](char))
        if invisible and draw(st.integers(0, 5)) == 0:
            chars.append(draw(st.sampled_from(INVISIBLES)))
    lead = draw(st.sampled_from(["", " ", "\u3000", "\u00a0"]))
    trail = draw(st.sampled_from(["", " ", "  ", "\u3000", "\u00a0"]))
    return lead + "".join(chars) + trail
