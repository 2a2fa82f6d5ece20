"""People's names: one normal form, and the spellings refused (broker/identity/people.py).

Look-alike letters are written as escapes on purpose: the point is that they can't be seen.
"""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.identity.people import (
    InvalidPerson,
    check_person,
    check_text,
    normalise_person,
    same_person_key,
)

CYRILLIC_A = "\u0430"
GREEK_OMICRON = "\u03bf"
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

_local = st.from_regex(r"[a-z][a-z0-9._-]{0,12}", fullmatch=True)
_domain = st.from_regex(r"[a-z][a-z0-9-]{0,8}\.(com|org|net)", fullmatch=True)
owners = st.builds(lambda local, domain: f"{local}@{domain}", _local, _domain)


def _fullwidth(char: str) -> str:
    # FF01..FF5E are the fullwidth forms of ASCII 21..7E; NFKC maps them back.
    return chr(ord(char) - 0x21 + 0xFF01) if "!" <= char <= "~" else char


@st.composite
def respellings(draw: st.DrawFn, name: str, *, invisible: bool = True) -> str:
    """`name` as a person would read it: other case, fullwidth letters, invisible characters,
    surrounding whitespace."""
    forms = {
        "same": lambda c: c,
        "upper": str.upper,
        "fullwidth": _fullwidth,
        "fullwidth-upper": lambda c: _fullwidth(c.upper()),
    }
    chars = []
    for char in name:
        chars.append(forms[draw(st.sampled_from(sorted(forms)))](char))
        if invisible and draw(st.integers(0, 5)) == 0:
            chars.append(draw(st.sampled_from(INVISIBLES)))
    lead = draw(st.sampled_from(["", " ", "\u3000", "\u00a0"]))
    trail = draw(st.sampled_from(["", " ", "  ", "\u3000", "\u00a0"]))
    return lead + "".join(chars) + trail


@given(st.data(), owners)
def test_every_respelling_has_the_owners_normal_form(data, owner):
    respelled = data.draw(respellings(owner))
    assert normalise_person(respelled) == normalise_person(owner) == owner
    assert same_person_key(respelled) == same_person_key(owner)


@given(st.data(), owners)
def test_respellings_without_hidden_characters_are_accepted(data, owner):
    check_person(data.draw(respellings(owner, invisible=False)))


@given(owners, st.sampled_from(INVISIBLES + CONTROLS), st.integers(0, 40))
def test_a_hidden_character_anywhere_is_refused(owner, hidden, at):
    at = min(at, len(owner))
    with pytest.raises(InvalidPerson):
        check_person(owner[:at] + hidden + owner[at:])
    with pytest.raises(InvalidPerson):
        check_text(f"purpose {owner[:at]}{hidden}{owner[at:]}")


@given(owners, st.integers(0, 40), st.sampled_from([CYRILLIC_A, GREEK_OMICRON, "\u0435", "\u0441"]))
def test_a_look_alike_letter_in_a_latin_name_is_refused(owner, at, lookalike):
    at = min(at, len(owner))
    with pytest.raises(InvalidPerson, match="mix"):
        check_person(owner[:at] + lookalike + owner[at:])


def test_a_name_spelt_wholly_in_look_alikes_still_meets_its_latin_twin():
    # "alice" with Cyrillic a, i, c, e: one script, so not refused, but the same person.
    spoof = "\u0430l\u0456\u0441\u0435"
    check_person(spoof.replace("l", "\u04cf"))
    assert normalise_person(spoof) != "alice"
    assert same_person_key(spoof) == same_person_key("alice") == "alice"


@pytest.mark.parametrize(
    ("value", "normal"),
    [
        ("Alice@Example.COM", "alice@example.com"),
        ("alice@example.com \u3000", "alice@example.com"),
        ("\uff41lice@example.com", "alice@example.com"),  # fullwidth a
        ("\ufb01ona@example.com", "fiona@example.com"),  # fi ligature
        ("Stra\u00dfe", "strasse"),  # sharp s case-folds to ss
        ("e\u0301mile", "\u00e9mile"),  # combining accent composes
    ],
)
def test_the_normal_form(value, normal):
    assert normalise_person(value) == normal


@pytest.mark.parametrize(
    "value",
    ["\u0438\u0432\u0430\u043d@\u043f\u0440\u0438\u043c\u0435\u0440.\u0440\u0444", "\u7530\u4e2d@example.jp", "Zo\u00eb"],
    ids=["all-cyrillic", "cjk-with-latin", "latin-with-diaeresis"],
)
def test_names_in_one_script_or_with_non_look_alike_scripts_are_accepted(value):
    check_person(value)


@pytest.mark.parametrize("value", ["", "   ", "\u3000", "\u200b"])
def test_a_blank_name_is_refused(value):
    with pytest.raises(InvalidPerson):
        check_person(value)


def test_refusals_never_quote_the_value():
    with pytest.raises(InvalidPerson) as caught:
        check_person("secret\u200bname")
    assert "secret" not in str(caught.value)


@given(st.text(max_size=30))
def test_the_normal_form_is_a_fixed_point(value):
    once = normalise_person(value)
    assert normalise_person(once) == once
    assert unicodedata.is_normalized("NFKC", once)
