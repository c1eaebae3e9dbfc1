"""The embedded demo corpus: real English prose that every Python installation has, no download.

`write_demo_corpus(out, seed=0)` writes a raw corpus folder with two sources:
`pydoc_topics/part-0.jsonl` (the help topics of `pydoc_data.topics`, cut into sections) and
`stdlib_docstrings/part-{0,1}.jsonl.zst` (module, class and function docstrings of the standard
library's top-level modules, read with `ast`, nothing imported). Records are
`{"text", "meta": {"source", "name"}, "id"}`. Into that real text it injects, with a seeded RNG,
material that dedup must remove: near duplicates (a few word edits, character 13-gram Jaccard of
the normalised texts >= 0.97), copies differing only in case, punctuation and whitespace, short
documents (real short docstrings), some of the copies in the other source. Every copy comes after
its original in input order, so dedup keeps the original. It returns what it injected (counts and
ids) so a demo or test can compare expected with found. Same output for a given seed and Python.
"""

from __future__ import annotations

import ast
import functools
import json
import random
import re
import string
import sysconfig
from pathlib import Path
from typing import Any

import zstandard

from lmpipe.dataprep.minhash import normalise

TOPICS, DOCSTRINGS = "pydoc_topics", "stdlib_docstrings"
# Real documents have at least this many normalised characters, the injected short ones at most
# SHORT_MAX: a margin on both sides of dedup's 200, so ftfy's small changes cannot move a document
# across it.
MIN_CHARS, SHORT_MAX = 240, 160
# Near-duplicate originals are long, so one to three word edits keep the Jaccard >= MIN_JACCARD,
# where 9 x 13 LSH misses a pair with probability (1 - 0.97^13)^9 < 1e-4.
NEAR_SOURCE_CHARS, MIN_JACCARD = 1200, 0.97
N_NEAR, N_EXACT, N_SHORT, CROSS_SHARE = 40, 20, 30, 0.3
SECTION_CHARS = 1500
_WORD = re.compile(r"\b[A-Za-z]{3,}\b")
_FILLERS = ("value", "object", "module", "function", "result", "method", "string", "number")


def char_ngrams(text: str, n: int = 13) -> set[str]:
    return {text[i : i + n] for i in range(max(1, len(text) - n + 1))}


def jaccard(a: str, b: str, n: int = 13) -> float:
    """True Jaccard of the character n-grams of two normalised texts."""
    x, y = char_ngrams(normalise(a), n), char_ngrams(normalise(b), n)
    return len(x & y) / len(x | y)


@functools.cache  # the sources never change within a process; parsing is the slow part
def topic_sections() -> tuple[tuple[str, str], ...]:
    """(name, text) of the pydoc help topics, cut at paragraph breaks into sections of about
    SECTION_CHARS, since some topics run to tens of kilobytes."""
    from pydoc_data.topics import topics

    out = []
    for topic in sorted(topics):
        parts, size, k = [], 0, 0
        for para in topics[topic].split("\n\n"):
            parts.append(para)
            size += len(para)
            if size >= SECTION_CHARS:
                out.append((f"{topic}#{k}", "\n\n".join(parts)))
                parts, size, k = [], 0, k + 1
        if parts:
            out.append((f"{topic}#{k}", "\n\n".join(parts)))
    return tuple(out)


@functools.cache
def stdlib_docstrings() -> tuple[tuple[str, str], ...]:
    """(qualified name, docstring) of every module, class and function docstring in the standard
    library's top-level modules, in file and source order. Parsed, never imported."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[tuple[str, str]] = []

    def visit(node: ast.AST, name: str) -> None:
        doc = ast.get_docstring(node)  # type: ignore[arg-type]
        if doc:
            out.append((name, doc))
        for child in getattr(node, "body", []):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, f"{name}.{child.name}")

    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):  # a file for another Python version: skip it
            continue
        visit(tree, path.stem)
    return tuple(out)


def _near_variant(rng: random.Random, text: str) -> str | None:
    """`text` with one to three words deleted or replaced, if the Jaccard stays high enough."""
    words = list(_WORD.finditer(text))
    for edits in (rng.randint(1, 3), 1):
        variant = text
        # Edit from the end backwards so the earlier match positions stay valid.
        for m in sorted(rng.sample(words, edits), key=lambda m: m.start(), reverse=True):
            new = "" if rng.random() < 0.5 else rng.choice(_FILLERS)
            variant = variant[: m.start()] + new + variant[m.end() :]
        if normalise(variant) != normalise(text) and jaccard(text, variant) >= MIN_JACCARD:
            return variant
    return None


def _surface_variant(rng: random.Random, text: str) -> str | None:
    """`text` with ASCII case, punctuation and whitespace changed: identical once normalised."""
    out = []
    for token in re.split(r"(\s+)", text):
        if token.isspace():
            token = rng.choice([" ", "  ", "\n", "\t ", token]) if rng.random() < 0.2 else token
        elif token.isascii() and rng.random() < 0.15:
            token = rng.choice([token.upper(), token.capitalize(), token + ",", token + ";"])
        elif rng.random() < 0.05:
            token = token.strip(string.punctuation) or token
        out.append(token)
    variant = "".join(out)
    return variant if variant != text and normalise(variant) == normalise(text) else None


def _record(source: str, name: str, text: str, id_: str | None = None) -> dict[str, Any]:
    return {"text": text, "meta": {"source": source, "name": name}, "id": id_ or f"{source}/{name}"}


def build_demo_corpus(seed: int = 0) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """The demo corpus in memory: records per source in input order, and what was injected."""
    rng = random.Random(seed)
    docs = {TOPICS: topic_sections(), DOCSTRINGS: stdlib_docstrings()}
    base: dict[str, list[dict[str, Any]]] = {}
    shorts = []
    for source, items in docs.items():
        base[source] = []
        for name, text in items:
            size = len(normalise(text))
            if size >= MIN_CHARS:
                base[source].append(_record(source, name, text))
            elif 20 <= size <= SHORT_MAX:
                shorts.append(_record(source, name, text))

    # Copies to insert: (source, first allowed position, record). A copy in the same source goes
    # after its original; a cross-source copy goes into the later source, anywhere.
    inserts: list[tuple[str, int, dict[str, Any]]] = []
    injected: dict[str, list[str]] = {"near_duplicate": [], "exact_duplicate": [], "short": []}
    cross = 0
    pool = [
        (source, i)
        for source in base
        for i, r in enumerate(base[source])
        if len(normalise(r["text"])) >= NEAR_SOURCE_CHARS
    ]
    rng.shuffle(pool)
    wanted = [("near_duplicate", N_NEAR), ("exact_duplicate", N_EXACT)]
    for kind, n in wanted:
        made = 0
        while made < n and pool:
            source, i = pool.pop()
            original = base[source][i]
            make = _near_variant if kind == "near_duplicate" else _surface_variant
            variant = make(rng, original["text"])
            if variant is None:
                continue
            to, first = source, i + 1
            if source == TOPICS and rng.random() < CROSS_SHARE:
                to, first = DOCSTRINGS, 0
                cross += 1
            id_ = f"{original['id']}~{kind}"
            inserts.append((to, first, _record(to, original["meta"]["name"], variant, id_)))
            injected[kind].append(id_)
            made += 1
    for r in rng.sample(shorts, min(N_SHORT, len(shorts))):
        source = r["meta"]["source"]
        inserts.append((source, 0, r))
        injected["short"].append(r["id"])

    corpus: dict[str, list[dict[str, Any]]] = {}
    for source, records in base.items():
        slots: list[list[dict[str, Any]]] = [[] for _ in range(len(records) + 1)]
        for to, first, r in inserts:
            if to == source:
                slots[rng.randint(first, len(records))].append(r)  # slot k: before record k
        corpus[source] = [x for k in range(len(records) + 1) for x in slots[k] + records[k : k + 1]]
    summary = {
        "documents": sum(len(v) for v in corpus.values()),
        "bytes": sum(len(r["text"].encode("utf-8")) for v in corpus.values() for r in v),
        "sources": {s: len(v) for s, v in corpus.items()},
        "near_duplicates": len(injected["near_duplicate"]),
        "exact_duplicates": len(injected["exact_duplicate"]),
        "short": len(injected["short"]),
        "cross_source": cross,
        "ids": injected,
    }
    return corpus, summary


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    if path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor(level=3).compress(data)
    path.write_bytes(data)


def write_demo_corpus(out: Path, *, seed: int = 0) -> dict[str, Any]:
    """Write the demo corpus under `out` (its own files are replaced; nothing else is touched)
    and return what was injected: counts, ids, documents and bytes per source."""
    corpus, summary = build_demo_corpus(seed)
    out = Path(out)
    files = []
    for source, records in corpus.items():
        (out / source).mkdir(parents=True, exist_ok=True)
        if source == TOPICS:  # one plain file here, compressed ones there: dedup reads both
            parts = [(out / source / "part-0.jsonl", records)]
        else:
            half = len(records) // 2
            parts = [
                (out / source / "part-0.jsonl.zst", records[:half]),
                (out / source / "part-1.jsonl.zst", records[half:]),
            ]
        for path, chunk in parts:
            _write_jsonl(path, chunk)
            files.append(str(path))
    return {**summary, "files": files}
