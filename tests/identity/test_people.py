"""People's names: one normal form, and the spellings refused (broker/identity/people.py)."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.identity.people import (
    InvalidPerson,
    check_person,
    check_text,
    fold_person,
    normalise_person,
    refused_character,
    same_person_key,
    scripts_of,
)
from tests.support.people import CONTROLS, INVISIBLES, respellings
from tests.support.people import owners as owner_names

CYRILLIC_A = "\u0430"
GREEK_OMICRON = "\u03bf"
owners = owner_names()


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
    [
        "\u0438\u0432\u0430\u043d@\u043f\u0440\u0438\u043c\u0435\u0440.\u0440\u0444",
        "\u7530\u4e2d@example.jp",
        "Zo\u00eb",
    ],
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


@given(st.text(alphabet=st.characters(max_codepoint=0x7F)))
def test_ascii_takes_a_shortcut_to_the_same_answers(value):
    """ASCII skips the per-character walk; every ASCII string gets what the walk gives."""
    refused = {refused_character(char) for char in value} - {None}
    if refused:
        with pytest.raises(InvalidPerson, match=next(iter(refused))):
            check_text(value)
    else:
        check_text(value)
    visible = "".join(char for char in value if refused_character(char) is None)
    assert fold_person(value) == unicodedata.normalize(
        "NFKC", unicodedata.normalize("NFKC", visible).casefold()
    )
    letters = {
        unicodedata.name(char).partition(" ")[0]
        for char in value
        if unicodedata.category(char).startswith("L")
    }
    assert scripts_of(value) == letters
