"""ftfy's output, exactly, at a fraction of its cost: `fix_text(text)` returns what
`ftfy.fix_text(text, normalization="NFC")` returns, byte for byte, for every text.

ftfy cuts a text into segments (lines, each with its newline, and at most `max_decode_length`
characters) and runs each through `fix_and_explain`: HTML unescaping, mojibake repair, eight
fixers, NFC, repeated until nothing changes. Most segments of real text give nothing to any of
those steps but NFC, yet pay a dozen passes over their characters. Which segments can be given
nothing is decided here from ftfy's own tables and regular expressions, read at import time:

- the fixers act only on characters they list: '&' (entities), '\\x1b' (terminal escapes), the C1
  controls, the keys of `LIGATURES`, `WIDTH_MAP` and `CONTROL_CHARS`, the quotes of
  `SINGLE_QUOTE_RE` / `DOUBLE_QUOTE_RE`, surrogates, and the line breaks `fix_line_breaks` replaces:
  these are the TRIGGERS;
- mojibake repair starts only when `badness.is_bad` finds a match of `BADNESS_RE`, and every
  alternative of that expression needs one character of a class of non-ASCII characters (its
  "guard", found by walking the parsed expression); the union of the guards is GUARDS. A text with
  no guard character cannot be bad; one with some is asked `is_bad` itself (one regex search).

A segment with no trigger that is not bad comes out of ftfy's loop as its NFC form, provided that
form is also free of triggers and not bad (else ftfy's second round could act on it): then that
is the answer; any other segment goes through `ftfy.fix_and_explain` with the configuration ftfy
itself would use at that point (HTML unescaping switches off for the rest of a text after the first
segment with a '<'). NFC of a whole text equals the NFC of its newline-ended segments joined (a
newline neither composes nor reorders), so a text of clean segments is answered in one call.

`benchmarks/ftfy_bench.py` checks the identity on every document of the benchmark corpora and
measures the speed; tests/dataprep/test_textfix.py checks it on generated text.
"""

from __future__ import annotations

import re
import re._constants as sre_constants
import re._parser as sre_parser
import unicodedata
from collections.abc import Callable
from functools import cache
from typing import NamedTuple

# What ftfy.fix_text can change in ASCII text: HTML entities (&), line breaks (\r) and the control
# characters it deletes (0x00-0x08, 0x0b, 0x0e-0x1f, 0x7f; \x1b starts terminal escapes).
_ASCII_TRIGGERS = re.compile(r"[&\r\x00-\x08\x0b\x0e-\x1f\x7f]")
# fix_line_breaks is code, not a table: the characters it replaces.
_LINE_BREAKS = "\r\u2028\u2029\x85"


def _class_chars(item: tuple) -> set[str] | None:
    """The characters one parsed regex item matches, if it is a literal or a plain class of
    literals and ranges; None for anything wider (categories such as \\s, negations, groups)."""
    op, arg = item
    if op == sre_constants.LITERAL:
        return {chr(arg)}
    if op != sre_constants.IN:
        return None
    chars: set[str] = set()
    for sub_op, sub_arg in arg:
        if sub_op == sre_constants.LITERAL:
            chars.add(chr(sub_arg))
        elif sub_op == sre_constants.RANGE:
            chars.update(map(chr, range(sub_arg[0], sub_arg[1] + 1)))
        else:
            return None
    return chars


def _letters(chars: set[str]) -> int:
    return sum(unicodedata.category(c).startswith("L") for c in chars)


def _guard(items: list) -> set[str] | None:
    """The guard of one alternative (a parsed sequence): of its items that are classes of
    non-ASCII characters only, the one with the fewest letters (letters are what a language's
    text is full of), then the smallest; None if it has no such item."""
    classes = [c for c in map(_class_chars, items) if c and all(ord(ch) > 127 for ch in c)]
    return min(classes, key=lambda c: (_letters(c), len(c))) if classes else None


def _alternatives(pattern: re.Pattern[str]) -> list[str]:
    """The top-level alternatives of a pattern's source, each a pattern of its own (the same
    flags): a text matches the pattern where one of them matches. Comments of a verbose pattern
    are dropped; '|' inside a class, a group or after a backslash does not split."""
    parts, current = [], []
    depth, in_class, i, src = 0, False, 0, pattern.pattern
    while i < len(src):
        c = src[i]
        if c == "\\":
            current.append(src[i : i + 2])
            i += 2
            continue
        if in_class:
            in_class = c != "]" or (bool(current) and current[-1] == "[")
        elif c == "[":
            in_class = True
        elif c == "#" and pattern.flags & re.VERBOSE:
            i = src.find("\n", i) + 1 or len(src)
            continue
        elif c in "()":
            depth += 1 if c == "(" else -1
        elif c == "|" and depth == 0:
            parts.append("".join(current))
            current = []
            i += 1
            continue
        current.append(c)
        i += 1
    parts.append("".join(current))
    return parts


def _char_class(chars: set[str]) -> re.Pattern[str]:
    return re.compile("[" + "".join(re.escape(c) for c in sorted(chars)) + "]")


class _Badness:
    """`ftfy.badness.is_bad`, exactly, searching only the alternatives of `BADNESS_RE` that can
    match: every alternative needs a character of its guard, so a text is asked only the
    alternatives whose guard characters it holds (a Russian text full of 'в' is asked about the
    one alternative guarded by 'в', not all 37 at every position)."""

    def __init__(self, pattern: re.Pattern[str]):
        self.alternatives = [re.compile(a, pattern.flags) for a in _alternatives(pattern)]
        tree = sre_parser.parse(pattern.pattern, pattern.flags)
        branches = (
            len(tree[0][1][1]) if len(tree) == 1 and tree[0][0] == sre_constants.BRANCH else 1
        )
        if branches != len(self.alternatives):
            raise RuntimeError(f"ftfy's badness pattern split in {len(self.alternatives)}, not {branches}")  # fmt: skip
        self.by_char: dict[str, list[int]] = {}
        for k, alt in enumerate(self.alternatives):
            guard = _guard(list(sre_parser.parse(alt.pattern, alt.flags)))
            if guard is None:  # a later ftfy could add one: then no text could skip a search
                raise RuntimeError(f"ftfy's badness pattern has an unguarded part: {alt.pattern}")
            for c in guard:
                self.by_char.setdefault(c, []).append(k)
        self.guards = _char_class(set(self.by_char))

    def __call__(self, text: str) -> bool:
        found = set(self.guards.findall(text))
        if not found:
            return False
        candidates = sorted({k for c in found for k in self.by_char[c]})
        return any(self.alternatives[k].search(text) for k in candidates)


class _Tables(NamedTuple):
    fixers: list[tuple[Callable[[str], str], re.Pattern[str]]]  # in ftfy's order, with triggers
    triggers: re.Pattern[str]  # any fixer's
    either: re.Pattern[str]  # a trigger or a guard of the badness pattern
    is_bad: _Badness


@cache
def _tables() -> _Tables:
    """The character classes, from the installed ftfy; built once per process (ftfy is imported
    here, not at the CLI's start)."""
    from ftfy import badness, chardata, fixes

    def matched(pattern: re.Pattern[str]) -> set[str]:  # a one-class pattern: all it matches
        guard = _guard(list(sre_parser.parse(pattern.pattern, pattern.flags)))
        if guard is None:  # a newer ftfy's pattern: fail here, not later as a None in a union
            raise RuntimeError(f"ftfy's pattern {pattern.pattern!r} is no longer one class")
        return guard

    # The fixers ftfy.fix_and_explain runs after mojibake repair, in its order, with the
    # characters each acts on.
    acts_on = {
        "fix_c1_controls": matched(fixes.C1_CONTROL_RE),
        "fix_latin_ligatures": set(map(chr, chardata.LIGATURES)),
        "fix_character_width": set(map(chr, chardata.WIDTH_MAP)),
        "uncurl_quotes": matched(chardata.SINGLE_QUOTE_RE) | matched(chardata.DOUBLE_QUOTE_RE),
        "fix_line_breaks": set(_LINE_BREAKS),
        "fix_surrogates": matched(fixes.SURROGATE_RE),
        "remove_terminal_escapes": {"\x1b"},  # ANSI_RE starts with it
        "remove_control_chars": set(map(chr, chardata.CONTROL_CHARS)),
    }
    triggers = set.union({"&"}, *acts_on.values())  # "&": unescape_html's entities
    is_bad = _Badness(badness.BADNESS_RE)
    return _Tables(
        [(getattr(fixes, name), _char_class(chars)) for name, chars in acts_on.items()],
        _char_class(triggers),
        _char_class(triggers | set(is_bad.by_char)),
        is_bad,
    )


def _clean(segment: str) -> bool:
    """True when no step of ftfy's round changes `segment` (NFC aside)."""
    tables = _tables()
    if tables.triggers.search(segment):
        return False
    return not tables.is_bad(segment)


def _nfc_if_clean(segment: str) -> str | None:
    """ftfy's answer for a segment that only NFC changes: its NFC form; None if ftfy's loop
    could do more with the segment or with its NFC form."""
    if not _clean(segment):
        return None
    if unicodedata.is_normalized("NFC", segment):
        return segment
    fixed = unicodedata.normalize("NFC", segment)
    return fixed if _clean(fixed) else None


def fix_text(text: str) -> str:
    """`ftfy.fix_text(text, normalization="NFC")`, exactly."""
    if text.isascii() and not _ASCII_TRIGGERS.search(text):
        return text
    import ftfy

    if len(text) > ftfy.TextFixerConfig().max_decode_length:
        return _by_segment(text)  # lines may be cut inside: ftfy's loop, segment by segment
    # Only the lines holding a trigger or guard character need a look; the stretches of lines
    # between them are clean, and NFC of a stretch is the NFC of its lines joined.
    out = []
    done = 0  # text[:done] is answered
    first_lt = text.find("<")
    for found in _tables().either.finditer(text):
        if found.start() < done:
            continue  # in a line already answered
        start = text.rfind("\n", 0, found.start()) + 1
        end = text.find("\n", found.start()) + 1 or len(text)
        if start > done:
            out.append(_clean_lines(text, done, start, first_lt))
        # ftfy stops unescaping HTML from the first line with a '<' on, that line included.
        out.append(_fix_segment(text[start:end], html=first_lt == -1 or first_lt >= end))
        done = end
    if done < len(text):
        out.append(_clean_lines(text, done, len(text), first_lt))
    return "".join(out)


def _clean_lines(text: str, start: int, end: int, first_lt: int) -> str:
    """The answer for whole lines text[start:end] without a trigger or guard character: their
    NFC form, unless composition made one (then line by line)."""
    lines = text[start:end]
    fixed = unicodedata.normalize("NFC", lines)
    if fixed == lines or not _tables().either.search(fixed):
        return fixed
    out = []
    for line in re.findall("[^\n]*\n|[^\n]+$", lines):  # ftfy's lines: ended by "\n" only
        start += len(line)
        out.append(_fix_segment(line, html=first_lt == -1 or first_lt >= start))
    return "".join(out)


def _fix_segment(segment: str, html: bool) -> str:
    """ftfy's answer for one segment; `html`: whether ftfy still unescapes HTML entities here.

    ftfy's round, as `fix_and_explain` runs it, with ftfy's own fixers in ftfy's order, repeated
    until nothing changes; only the call to mojibake repair is left out, which is exact while the
    text is not bad (repair then returns it unchanged). A bad text goes to ftfy whole."""
    fixed = _nfc_if_clean(segment)
    if fixed is not None:
        return fixed
    from ftfy import fixes

    html = html and "<" not in segment  # as fix_and_explain decides, once per segment
    tables = _tables()
    text = segment
    while True:
        before = text
        if html and "&" in text:
            text = fixes.unescape_html(text)
        if tables.is_bad(text):
            import ftfy

            config = ftfy.TextFixerConfig(normalization="NFC", explain=False)
            return ftfy.fix_and_explain(
                segment, config._replace(unescape_html="auto" if html else False)
            ).text
        for fixer, acts_on in tables.fixers:  # a fixer leaves a text without its characters be
            if acts_on.search(text):
                text = fixer(text)
        text = unicodedata.normalize("NFC", text)
        if text == before:
            return text


def _by_segment(text: str) -> str:
    """ftfy.fix_text's own loop over segments, with the shortcut per segment."""
    import ftfy

    max_length = ftfy.TextFixerConfig().max_decode_length
    out = []
    pos, html = 0, True
    while pos < len(text):
        end = min(text.find("\n", pos) + 1 or len(text), pos + max_length)
        segment = text[pos:end]
        html = html and "<" not in segment
        out.append(_fix_segment(segment, html))
        pos = end
    return "".join(out)


def fix_text_reference(text: str) -> str:
    """ftfy itself, for `lmpipe dedup --fixer ftfy` and as the tests' reference."""
    import ftfy

    return ftfy.fix_text(text, normalization="NFC")
