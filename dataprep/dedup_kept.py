"""The last steps of `lmpipe dedup`, over the documents it kept: eval data, n-gram overlap,
holdout and the written output. Units, markers and resume work as in `dedup_steps.py`.

  evals       per eval file: the SHA-256 set of its texts (and with n-grams, their set)
  eval_union  one unit (with n-grams): the eval files' n-grams in one sorted array
  ngrams      per input file (with n-grams): its kept documents that share one with eval data
  holdout     per input file (with a holdout): the SHA-256 digests of its documents drawn for it
  filter      per input file: training records -> `part-<file>.jsonl.zst`, held-out records ->
              `_holdout/part-<file>.jsonl.zst`, its removal listing and counts per source

The order of decisions for a document dedup kept (`_fates`): its exact text in eval data, then
an n-gram shared with eval data ("decontaminated"), then the holdout draw ("held_out"), then its
text equal to a held-out one's ("decontaminated": SlimPajama's guarantee).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from lmpipe.dataprep.clusters import DECONTAMINATED, EXACT, HELD_OUT, KEPT, NEAR, SHORT
from lmpipe.dataprep.decontaminate import (
    EVAL_NGRAMS,
    NGRAMS,
    NgramSet,
    eval_set_path,
    match_documents,
    union_path,
    write_matches,
    write_union,
)
from lmpipe.dataprep.dedup_settings import DedupSettings
from lmpipe.dataprep.dedup_steps import (
    BUCKETS,
    HOLDOUT,
    REASONS,
    ZstdLines,
    doc_ref,
    finish_unit,
    load_ids,
    load_meta,
    marker,
    part_name,
    read_marker,
    zstd_lines,
)
from lmpipe.dataprep.documents import InvalidLines
from lmpipe.dataprep.holdout import as_digests, digest_set, held_out, read_field, text_digest


def eval_file(state: Path, e: int, path: Path, settings: DedupSettings) -> dict[str, Any]:
    """The SHA-256 set of eval file e's texts (its `decontaminate_field`, fixed when the corpus
    is: the two must be compared in the same form) and, with `decontaminate_ngrams`, the set of
    its word n-grams."""
    fix, ngrams = settings.fixer_fn(), settings.decontaminate_ngrams
    field, strict = settings.decontaminate_field, settings.strict
    invalid = InvalidLines()
    shas, grams = [], NgramSet(ngrams)
    for _, text in read_field(path, field, strict, invalid):
        text = fix(text) if fix else text
        shas.append(text_digest(text))
        if ngrams:
            grams.add(text)
    np.save(state / "evals" / f"{e:05d}.npy", digest_set([as_digests(b"".join(shas))]))
    info = {
        "documents": len(shas),
        "invalid": invalid.count,
        "invalid_examples": invalid.examples,
        "blank_lines": invalid.blank,
    }
    if ngrams:
        found = grams.array()
        np.save(eval_set_path(state / EVAL_NGRAMS, e), found)
        info.update(ngrams=len(found), short_for_ngrams=grams.short)
    return finish_unit(marker(state, "evals", e), info)


def eval_ngram_union(state: Path, count: int) -> dict[str, Any]:
    """One sorted array of the N-grams of all `count` eval files, read by every `ngram_file`."""
    return finish_unit(
        marker(state, "eval_union"), {"ngrams": write_union(state / EVAL_NGRAMS, count)}
    )


def ngram_file(state: Path, f: int, n: int, eval_names: list[str]) -> dict[str, Any]:
    """Which of file f's documents still kept after `decide` share an n-word sequence with an
    eval text (`decontaminate.py`), and the sequence, for the removal listing."""
    meta = load_meta(state, f)
    reason, _ = _decided(state, f, meta)
    fixed = zstd_lines(state / "scan" / f"{f:05d}.fixed.jsonl.zst")
    not_short = np.flatnonzero(~meta["short"]).tolist()
    texts = (
        (row, json.loads(line)["text"])
        for row, line in zip(not_short, fixed, strict=True)
        if reason[row] == KEPT  # a duplicate goes anyway: its text is not read twice
    )
    folder = state / EVAL_NGRAMS
    union = np.load(union_path(folder))
    sets = [(name, eval_set_path(folder, e)) for e, name in enumerate(eval_names)]
    found = match_documents(texts, n, union, sets)
    write_matches(state / NGRAMS / f"{f:05d}.json", found)
    return finish_unit(marker(state, NGRAMS, f), {"documents": len(found)})


def _decided(state: Path, f: int, meta: dict[str, np.ndarray]) -> tuple[np.ndarray, dict]:
    """File f's decision per document after `decide`, and what each duplicate duplicates."""
    reason = np.where(meta["short"], SHORT, KEPT).astype(np.int8)
    decided = state / "decide" / f"{f:05d}.json"
    if not decided.is_file():
        return reason, {}
    d = json.loads(decided.read_text(encoding="utf-8"))
    reason[d["rows"]] = d["reasons"]
    return reason, dict(zip(d["rows"], d["duplicate_of"], strict=True))


def _kept_digests(state: Path, f: int, meta: dict, reason: np.ndarray) -> tuple[np.ndarray, ...]:
    """Rows of the documents still KEPT, and their SHA-256 digests."""
    rows = np.flatnonzero(reason == KEPT)
    sha = np.load(state / "scan" / f"{f:05d}.sha.npy")  # one per document that is not short
    return rows, sha[np.searchsorted(np.flatnonzero(~meta["short"]), rows)]


def _fates(state: Path, f: int, fraction: float, seed: int, evals: np.ndarray) -> tuple:
    """Decisions with steps 1 and 2 of `holdout.py` applied: eval matches (exact text, then
    n-gram overlap) DECONTAMINATED, then the draw HELD_OUT among the rest; and why each
    decontaminated document was."""
    meta = load_meta(state, f)
    reason, dup_of = _decided(state, f, meta)
    rows, sha = _kept_digests(state, f, meta, reason)
    same = rows[np.isin(sha, evals)]
    reason[same] = DECONTAMINATED
    detail = dict.fromkeys(same.tolist(), "same text as an eval document")
    overlap = state / NGRAMS / f"{f:05d}.json"
    if overlap.is_file():
        found = read_marker(overlap)
        for row, why in zip(found["rows"], found["details"], strict=True):
            if reason[row] == KEPT:
                reason[row] = DECONTAMINATED
                detail[row] = why
    rows, sha = _kept_digests(state, f, meta, reason)
    reason[rows[held_out(sha, fraction, seed)]] = HELD_OUT
    return meta, reason, dup_of, detail


def holdout_file(state: Path, f: int, settings: DedupSettings) -> dict[str, Any]:
    """The digests of file f's held-out documents, which every file's training output avoids."""
    fraction, seed = settings.holdout, settings.holdout_seed
    meta, reason, _, _ = _fates(state, f, fraction, seed, _digests(state, "evals"))
    held = np.flatnonzero(reason == HELD_OUT)
    sha = np.load(state / "scan" / f"{f:05d}.sha.npy")
    np.save(state / "holdout" / f"{f:05d}.npy", sha[np.searchsorted(np.flatnonzero(~meta["short"]), held)])  # fmt: skip
    return finish_unit(marker(state, "holdout", f), {"held_out": len(held)})


def _digests(state: Path, step: str) -> np.ndarray:
    return digest_set(np.load(p) for p in sorted((state / step).glob("*.npy")))


def filter_file(
    state: Path, f: int, name: str, source: str, settings: DedupSettings
) -> dict[str, Any]:
    """Write file f's training records (`part-<f>.jsonl.zst` beside the state folder, none when
    it keeps nothing), its held-out records (`_holdout/part-<f>.jsonl.zst`) and its removal
    listing; report its counts per source and bucket (`source`: the file's, unless scan read
    one per document)."""
    info = load_ids(state, f)
    fraction, seed = settings.holdout, settings.holdout_seed
    meta, reason, dup_of, detail = _fates(state, f, fraction, seed, _digests(state, "evals"))
    rows, sha = _kept_digests(state, f, meta, reason)
    leaked = rows[np.isin(sha, _digests(state, "holdout"))]
    reason[leaked] = DECONTAMINATED
    detail.update({row: "same text as a held-out document" for row in leaked.tolist()})
    kept, held = int((reason == KEPT).sum()), int((reason == HELD_OUT).sum())
    if held:
        (state.parent / HOLDOUT).mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        # Parts only for files that keep (or hold out) something; both from the fixed records.
        sinks = {
            code: stack.enter_context(ZstdLines(path))
            for code, n, path in (
                (KEPT, kept, state.parent / part_name(f)),
                (HELD_OUT, held, state.parent / HOLDOUT / part_name(f)),
            )
            if n
        }
        if sinks:
            fixed = zstd_lines(state / "scan" / f"{f:05d}.fixed.jsonl.zst")
            not_short = np.flatnonzero(~meta["short"]).tolist()
            for row, line in zip(not_short, fixed, strict=True):
                if int(reason[row]) in sinks:
                    sinks[int(reason[row])].write_line(line)
    listing: list[dict[str, Any]] = [
        {"file": name, "line": line_no, "reason": "invalid", "detail": why}
        for line_no, why in info["invalid"]
    ]
    for row in np.flatnonzero((reason != KEPT) & (reason != HELD_OUT)).tolist():
        entry = {**doc_ref(name, meta["lines"], info["ids"], row), "reason": REASONS[int(reason[row])]}  # fmt: skip
        if reason[row] in (EXACT, NEAR):
            entry["duplicate_of"] = dup_of[row]
        elif reason[row] == DECONTAMINATED:
            entry["detail"] = detail[row]
        listing.append(entry)
    listing.sort(key=lambda e: e["line"])
    with open(state / "filter" / f"{f:05d}.removed.jsonl", "wb") as out:
        for entry in listing:
            # A file name that is not UTF-8 reaches here as surrogate escapes (os.fsdecode);
            # backslashreplace writes each as its JSON escape (`\udce9`), which reads back as the
            # same name, where plain UTF-8 would stop the stage at its very end.
            text = json.dumps(entry, ensure_ascii=False) + "\n"
            out.write(text.encode("utf-8", "backslashreplace"))
    return finish_unit(
        marker(state, "filter", f),
        {"kept": kept, "held_out": held, "counts": _counts(meta, info, reason, source)},
    )


def _counts(meta: dict, info: dict, reason: np.ndarray, source: str) -> dict[str, Any]:
    """Documents and bytes per source and bucket. Bytes are those of the input `text`; an
    invalid line has no text (a document of 0 bytes) and no source field, so it counts under
    the file's `source`."""
    by_field = info["sources"] is not None
    sources = np.array(info["sources"] if by_field else [source] * len(reason), dtype=object)
    counts: dict[str, Any] = {}
    # With --source-field the file's own source appears only when it has invalid lines to count.
    named = {*sources.tolist(), *([source] if info["invalid"] or not by_field else [])}
    for name in sorted(named):
        mine = sources == name
        c = counts[name] = {b: {"documents": 0, "bytes": 0} for b in ("input", *BUCKETS)}
        c["input"] = {"documents": int(mine.sum()), "bytes": int(meta["nbytes"][mine].sum())}
        for code, bucket in enumerate(BUCKETS[:-1]):
            at = mine & (reason == code)
            c[bucket] = {"documents": int(at.sum()), "bytes": int(meta["nbytes"][at].sum())}
    if source in counts:
        counts[source]["invalid"]["documents"] = len(info["invalid"])
        counts[source]["input"]["documents"] += len(info["invalid"])
    return counts
