"""lmpipe's fix_text is ftfy.fix_text(NFC), exactly: on generated text made to hit every fixer,
mojibake of several codecs, NFC compositions that create trigger characters, and the segment
rules; and the tables it is built on hold for every code point."""

from __future__ import annotations

import random
import re
import sys

import ftfy
import pytest
from ftfy import badness, fixes

from lmpipe.dataprep.textfix import _tables, fix_text, fix_text_reference

WORDS = "the quick brown fox jumps over lazy dog data model token".split()
ACCENTED = ["café", "naïve", "résumé", "Ärger", "Øre", "señor", "Łódź", "ça", "déjà vu", "Ñandú"]
SCRIPTS = ["日本語の文章", "中文文本", "한국어", "Привет мир", "Γειά σου", "שלום", "مرحبا", "नमस्ते"]
TYPOGRAPHY = [
    "\u2018q\u2019",
    "\u201cq\u201d",
    "\u2014",
    "\u2026",
    "\u00a0",
    "\u2010",
    "€5",
    "°C",
    "±1",
]
FIXER_BAIT = [
    "&amp;", "&eacute;", "&#x2019;", "&nTILDE;", "&not that", "<b>", "\x1b[1m", "\x1b[0m",
    "\ufb01", "\ufb02", "\u0133", "\uff21\uff22", "\u3000", "\uff71", "\r\n", "\r", "\u2028",
    "\u2029", "\x85", "\x00", "\x07", "\x7f", "\ufeff", "\u206a", "\ufffc", "\x80", "\x9d",
    "\ud83d\udca9", "\udca9", "\u02bc",
]  # fmt: skip
# NFC compositions: some make characters of ftfy's classes (Ã, Â, Ð-like, accented capitals).
DECOMPOSED = ["A\u0303", "A\u0302", "e\u0301", "A\u0300", "O\u0308", "\u0301", "c\u0327", "I\u0302"]
CODECS = ["cp1252", "latin-1", "mac_roman", "cp1251", "cp1253", "cp1257", "cp437"]


def mojibake(rng: random.Random, text: str) -> str:
    """UTF-8 bytes read with another codec, sometimes twice."""
    for _ in range(rng.choice([1, 1, 2])):
        text = text.encode("utf-8").decode(rng.choice(CODECS), errors="replace")
    return text


def generated_text(rng: random.Random) -> str:
    pieces = []
    for _ in range(rng.randint(1, 60)):
        r = rng.random()
        if r < 0.35:
            piece = rng.choice(WORDS)
        elif r < 0.5:
            piece = rng.choice(ACCENTED)
        elif r < 0.6:
            piece = rng.choice(SCRIPTS)
        elif r < 0.7:
            piece = rng.choice(TYPOGRAPHY)
        elif r < 0.8:
            piece = mojibake(rng, rng.choice(ACCENTED + SCRIPTS + TYPOGRAPHY))
        elif r < 0.88:
            piece = rng.choice(FIXER_BAIT)
        elif r < 0.94:
            piece = rng.choice(DECOMPOSED)
        else:
            piece = chr(rng.randrange(0x80, 0x3000))  # anything, guard characters included
        pieces.append(piece)
        pieces.append(rng.choice([" ", " ", " ", "\n", "", ". "]))
    return "".join(pieces)


@pytest.mark.parametrize("seed", range(4))
def test_fix_text_equals_ftfy_on_generated_text(seed):
    rng = random.Random(seed)
    changed = 0
    for _ in range(1500):
        text = generated_text(rng)
        want = ftfy.fix_text(text, normalization="NFC")
        assert fix_text(text) == want, ascii(text)
        changed += want != unicodedata_nfc(text)
    assert changed > 300  # the generator does reach ftfy's fixers, not only NFC


def unicodedata_nfc(text: str) -> str:
    import unicodedata

    return unicodedata.normalize("NFC", text)


def test_segment_rules_of_ftfy_are_kept():
    # A '<' switches HTML unescaping off for the rest of the text, not before it.
    text = "a &amp; b\n<p> c &amp; d\ne &amp; f"
    assert fix_text(text) == ftfy.fix_text(text, normalization="NFC") == "a & b\n<p> c &amp; d\ne &amp; f"  # fmt: skip
    # A line longer than ftfy's max_decode_length is cut there, even inside a composed pair.
    long = "e" * (ftfy.TextFixerConfig().max_decode_length - 1) + "e\u0301 caf\u00e9 \u201cq\u201d"
    assert fix_text(long) == ftfy.fix_text(long, normalization="NFC")
    mojibake_line = "ok line\nthe Ã©tÃ© line\nlast"  # only the bad line is repaired
    assert fix_text(mojibake_line) == ftfy.fix_text(mojibake_line, normalization="NFC")
    assert fix_text("") == "" and fix_text_reference("x\r\n") == "x\n"


def test_ascii_fast_path_equals_ftfy():
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(128)] + ["&amp;", "&lt;", "<b>", "\r\n", "\x1b[31m"]
    weights = [1] * 128 + [5] * 5
    for _ in range(3000):
        text = "".join(rng.choices(alphabet, weights, k=rng.randint(1, 40)))
        assert fix_text(text) == ftfy.fix_text(text, normalization="NFC"), repr(text)
    assert fix_text("donâ€™t") == "don't"  # non-ASCII still goes through ftfy


def all_code_points_but(excluded) -> str:
    return "".join(
        chr(c)
        for c in range(sys.maxunicode + 1)
        if not 0xD800 <= c < 0xE000 and not excluded.match(chr(c))
    )


def test_no_fixer_changes_any_character_outside_its_own():
    """Each fixer ftfy runs, on one string of every code point it is not listed to act on:
    nothing changes. (The fixers act character by character, but for entities, which need '&',
    terminal escapes, which need '\\x1b', and CRLF, which needs '\\r': all listed.)"""
    text = all_code_points_but(re.compile("&"))
    assert fixes.unescape_html(text) == text
    for fixer, acts_on in _tables().fixers:
        text = all_code_points_but(acts_on)
        assert fixer(text) == text, fixer.__name__
        first = next(chr(c) for c in range(sys.maxunicode + 1) if acts_on.match(chr(c)))
        assert fixer(f"a{first}[1mb") != f"a{first}[1mb"  # and it does act on its own


def test_no_guard_character_no_badness():
    """Without a guard character, ftfy's badness pattern cannot match, whatever surrounds it:
    strings of every other code point, shuffled, with ASCII and spaces between."""
    others = list(all_code_points_but(_tables().is_bad.guards))
    rng = random.Random(0)
    for _ in range(3):
        rng.shuffle(others)
        text = "".join(c + rng.choice(["", " ", "a", "\n", "."]) for c in others)
        assert not badness.is_bad(text)
    # and the guards are needed: each of a few guard characters in context makes a text bad
    assert badness.is_bad("caf\u00c3\u00a9") and _tables().is_bad.guards.search("\u00c3")


@pytest.mark.parametrize("seed", range(2))
def test_badness_by_guarded_alternatives_equals_ftfy(seed):
    """lmpipe asks only the alternatives of BADNESS_RE whose guard characters a text holds."""
    rng = random.Random(seed)
    bad = 0
    for _ in range(3000):
        text = generated_text(rng)
        for line in text.split("\n"):
            assert _tables().is_bad(line) == badness.is_bad(line), ascii(line)
            bad += badness.is_bad(line)
    assert bad > 500
