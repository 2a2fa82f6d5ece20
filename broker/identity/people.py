"""People's names (task owners, approvers): one normal form, and the spellings refused.

Separation of duties ("the owner may not approve", "approvers are distinct people") is a
comparison of names, and a comparison of raw strings is beaten by any respelling a person
reads as the same name: another case, a trailing space, a zero-width character, a
fullwidth or ligature form, a Cyrillic `a` (U+0430) in a Latin name. So:

- `check_person` refuses what has no business in a name and would hide a difference from
  the person reading it: control characters (all of Unicode `Cc`, tab and line breaks
  included), line and paragraph separators, format and other invisible characters (`Cf`,
  the default-ignorable code points such as U+00AD, U+034F, U+115F, U+3164, variation
  selectors), private-use and unassigned code points, and a mix of Latin, Cyrillic and
  Greek letters (Python has no script property; a letter's character name starts with
  its script, `LATIN SMALL LETTER A` against `CYRILLIC SMALL LETTER A`).
- `normalise_person` is the one form names are compared and matched in: invisible
  characters dropped, Unicode NFKC (compatibility forms folded: fullwidth
  letters to ASCII, the `fi` ligature U+FB01 to `fi`),
  case folded, NFKC again (case folding can undo it), surrounding whitespace stripped.
- `same_person_key` goes one step further for the refusals only (owner vs approver, one
  vote per person): it also maps the Cyrillic and Greek letters that look like Latin ones
  to those, so a name spelt wholly in look-alikes still meets its Latin twin. It may join
  two real people; for a refusal that errs the safe way. Never match grants with it.

Limits: only Latin, Cyrillic and Greek look-alikes are known (not Armenian, Cherokee,
digits for letters, `rn` for `m`), and two accounts of one person with unrelated names
can't be told apart by any spelling rule (docs/security.md).
"""

from __future__ import annotations

import re
import unicodedata

MAX_PERSON_LENGTH = 200

# Default_Ignorable_Code_Point (Unicode DerivedCoreProperties) outside category Cf, plus
# U+2800 BRAILLE PATTERN BLANK, which renders as a space but is a symbol.
_INVISIBLE_RANGES = (
    (0x00AD, 0x00AD),  # soft hyphen (Cf, listed for the reader)
    (0x034F, 0x034F),  # combining grapheme joiner
    (0x115F, 0x1160),  # Hangul choseong/jungseong fillers
    (0x17B4, 0x17B5),  # Khmer inherent vowels
    (0x180B, 0x180F),  # Mongolian free variation selectors, vowel separator
    (0x2800, 0x2800),  # braille pattern blank
    (0x3164, 0x3164),  # Hangul filler
    (0xFE00, 0xFE0F),  # variation selectors
    (0xFFA0, 0xFFA0),  # halfwidth Hangul filler
    (0xE0100, 0xE01EF),  # variation selectors supplement
)
# Cc control, Cf format (zero-width, bidi, BOM, word joiner...), Co private use, Cn
# unassigned (a later Unicode may give it any meaning), Cs lone surrogates, Zl/Zp the
# line and paragraph separators.
_REFUSED_CATEGORIES = {
    "Cc": "control",
    "Cf": "invisible",
    "Co": "private-use",
    "Cn": "unassigned",
    "Cs": "surrogate",
    "Zl": "line-break",
    "Zp": "line-break",
}
_CONFUSABLE_SCRIPTS = ("LATIN", "CYRILLIC", "GREEK")

# After case folding: Cyrillic and Greek letters drawn like a Latin one (small letters, and
# the small forms of capitals drawn like Latin capitals: Cyrillic ve U+0432 for B, en
# U+043D for H), and a few Latin letters that read as plain ones. Code points, not the
# letters themselves, so this file shows no look-alikes either.
_LOOKALIKES = str.maketrans(
    {
        # Cyrillic
        0x0430: "a", 0x0432: "b", 0x0435: "e", 0x04BB: "h", 0x043D: "h", 0x0456: "i",
        0x0458: "j", 0x043A: "k", 0x04CF: "l", 0x043C: "m", 0x043E: "o", 0x0440: "p",
        0x051B: "q", 0x0441: "c", 0x0455: "s", 0x0442: "t", 0x0443: "y", 0x04AF: "y",
        0x0445: "x", 0x051D: "w", 0x0501: "d",
        # Greek
        0x03B1: "a", 0x03B2: "b", 0x03B5: "e", 0x03B6: "z", 0x03B7: "n", 0x03B9: "i",
        0x03BA: "k", 0x03BC: "m", 0x03BD: "v", 0x03BF: "o", 0x03C1: "p", 0x03C4: "t",
        0x03C5: "u", 0x03C7: "x", 0x03B3: "y", 0x03C9: "w",
        # Latin
        0x0131: "i", 0x0237: "j", 0x0261: "g",
    }
)  # fmt: skip


_INVISIBLE = frozenset(code for low, high in _INVISIBLE_RANGES for code in range(low, high + 1))
# In ASCII the only refused characters are the controls, NFKC changes nothing, case
# folding is lower(), and every letter is Latin: most names and purposes are ASCII, and
# this is the same answer as the per-character walk (tests/identity/test_people.py).
_ASCII_CONTROL = re.compile("[\x00-\x1f\x7f]")


class InvalidPerson(ValueError):
    """A name the broker won't compare; `str()` says why without quoting the value."""


def _invisible(char: str) -> bool:
    return ord(char) in _INVISIBLE


def refused_character(char: str) -> str | None:
    """What kind of character this is if names and free text may not hold it, else None."""
    kind = _REFUSED_CATEGORIES.get(unicodedata.category(char))
    if kind is None and _invisible(char):
        kind = "invisible"
    return kind


def check_text(value: str) -> None:
    """Refuse control, line-break, invisible and bidi characters (purpose, reasons).

    Raises `InvalidPerson` naming the kind of character, never the text.
    """
    if value.isascii():
        if _ASCII_CONTROL.search(value):
            raise InvalidPerson("must not contain control characters")
        return
    for char in value:
        kind = refused_character(char)
        if kind is not None:
            raise InvalidPerson(f"must not contain {kind} characters")


def scripts_of(value: str) -> set[str]:
    """The confusable scripts (Latin, Cyrillic, Greek) among the letters of `value`."""
    if value.isascii():
        return {"LATIN"} if any(char.isalpha() for char in value) else set()
    found = set()
    for char in value:
        if unicodedata.category(char).startswith("L"):
            script = unicodedata.name(char, "").partition(" ")[0]
            if script in _CONFUSABLE_SCRIPTS:
                found.add(script)
    return found


def check_person(value: str) -> None:
    """Refuse a name with hidden characters or mixed look-alike scripts (`InvalidPerson`)."""
    check_text(value)
    if not normalise_person(value):
        raise InvalidPerson("must not be blank")
    # Checked on the NFKC form: fullwidth and mathematical Latin letters are Latin there.
    scripts = scripts_of(unicodedata.normalize("NFKC", value))
    if len(scripts) > 1:
        mix = " and ".join(sorted(script.title() for script in scripts))
        raise InvalidPerson(f"must not mix {mix} letters (look-alikes)")


def normalise_person(value: str) -> str:
    """The form a name is compared and matched in: invisibles dropped, NFKC, case folded, stripped."""
    return fold_person(value).strip()


def fold_person(value: str) -> str:
    """`normalise_person` without the strip: for pieces of a name, such as a glob's literals."""
    if value.isascii():
        return _ASCII_CONTROL.sub("", value).lower()
    visible = "".join(char for char in value if refused_character(char) not in {"invisible", "control"})
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", visible).casefold())
    return folded


def same_person_key(value: str) -> str:
    """`normalise_person` with look-alike letters mapped to Latin: for refusals only."""
    return normalise_person(value).translate(_LOOKALIKES)
