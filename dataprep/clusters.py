"""Clusters of documents: LSH band keys, candidate pairs from equal keys, connected components.

The pure, in-memory pieces of `lmpipe dedup`'s decisions, shared by the on-disk steps
(`dedup_steps.py`) and `decide` (the same decisions for documents held in memory: the tests'
reference for the steps). Documents are numbered in input order; "the first" of a group is the
smallest.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from lmpipe.dataprep.minhash import fmix64

# A document's decision. The first four are dedup's; DECONTAMINATED and HELD_OUT are given after
# it, to documents it kept (`holdout.py`).
KEPT, SHORT, EXACT, NEAR, DECONTAMINATED, HELD_OUT = range(6)
# Two seeds for the two 64-bit halves of a band key (arbitrary odd constants).
_KEY_SEEDS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F)


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(documents, bands, 2) uint64: a 128-bit key per band of each signature, the band's index
    mixed in so that equal values in different bands do not meet."""
    n, words = len(signatures), (rows + 1) // 2
    # The band's values two to a uint64 word (a zero pads an odd count), every band at once: the
    # cost is a few vector passes per word, not a Python call per band and value.
    values = np.zeros((n, bands, 2 * words), dtype=np.uint32)
    values[:, :, :rows] = signatures[:, : bands * rows].reshape(n, bands, rows)
    packed = values.view(np.uint64)
    out = np.empty((n, bands, 2), dtype=np.uint64)
    band = np.arange(1, bands + 1, dtype=np.uint64)
    for half, seed in enumerate(_KEY_SEEDS):
        h = np.broadcast_to(band * np.uint64(seed), (n, bands)).copy()
        for w in range(words):
            h = fmix64(h ^ packed[:, :, w])  # a bijection per word: distinct inputs stay apart
        out[:, :, half] = h
    return out


def bucket_pairs(k1: np.ndarray, k2: np.ndarray, gid: np.ndarray, window: int = 0) -> np.ndarray:
    """(pairs, 2) int64 (later, earlier), unique, over entries that share the key (k1, k2).

    `window=0`: each entry with the first (smallest gid) of its bucket, as SlimPajama's
    generate_duplicate_pairs.py pairs them (enough for connected components). `window=w`: also
    with the w entries before it in its bucket; with verification an edge to the first may fail
    where one to a later member holds, and the window gives those a chance without the quadratic
    cost of every pair in a large bucket."""
    if len(gid) == 0:
        return np.empty((0, 2), dtype=np.int64)
    order = np.lexsort((gid, k2, k1))
    k1, k2, gid = k1[order], k2[order], gid[order]
    new = np.r_[True, (k1[1:] != k1[:-1]) | (k2[1:] != k2[:-1])]
    group = np.cumsum(new) - 1
    first = gid[new][group]
    found = [np.stack([gid[~new], first[~new]], axis=1)]
    for k in range(1, window + 1):
        same = np.flatnonzero(group[k:] == group[:-k])
        if len(same) == 0:
            break
        found.append(np.stack([gid[same + k], gid[same]], axis=1))
    pairs = np.concatenate(found).astype(np.int64)
    return np.unique(pairs, axis=0) if len(pairs) else pairs


# Pairs per union-find batch: large enough to amortise numpy's per-call cost, small enough to
# bound the temporaries (~100 bytes a pair).
UNION_BATCH = 1 << 22


def _batches(chunks: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    pending: list[np.ndarray] = []
    held = 0
    for chunk in chunks:
        pending.append(chunk)
        held += len(chunk)
        if held >= size:
            yield np.concatenate(pending)
            pending, held = [], 0
    if held:
        yield np.concatenate(pending)


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    """The smallest member of each node's connected component, nodes 0..n-1, all pairs at once.

    Vectorised as hooking + pointer jumping: every label points to a smaller (or equal) member of
    the same component; each round hooks the root of the larger side of every unsatisfied pair onto
    the smaller root, then flattens. At the fixed point the component's minimum is its own label.
    """
    labels = np.arange(n, dtype=np.int64)
    u, v = pairs[:, 0], pairs[:, 1]
    while True:
        lu, lv = labels[u], labels[v]
        open_ = lu != lv
        if not open_.any():
            return labels
        lo = np.minimum(lu[open_], lv[open_])
        np.minimum.at(labels, lu[open_], lo)
        np.minimum.at(labels, lv[open_], lo)
        while True:  # pointer jumping until every label is a root
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped


def _roots(labels: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The root of each of `x`, following labels (each points to a smaller or equal member)."""
    r = labels[x]
    while True:
        up = labels[r]
        if np.array_equal(up, r):
            return r
        r = up


def union_find(n: int, pairs: np.ndarray | Iterable[np.ndarray]) -> np.ndarray:
    """The smallest member of each document's connected component (the partition union-find over
    the pairs gives), for documents 0..n-1. `pairs`: one (k, 2) array, or several, streamed.

    Pairs are joined a batch at a time into `labels`, where every document points to a smaller (or
    equal) member of its component and a root, the smallest member found so far, to itself. A
    batch becomes pairs of the roots of its endpoints; `_components` solves that small graph, and
    each root in it is pointed at its group's smallest root, which is the merged component's
    minimum. So a batch costs in proportion to its pairs, not to n, and a pair joined by an
    earlier batch stays joined (later batches only hook whole roots under smaller ones). One pass
    of pointer jumping over all labels at the end makes each label its component's minimum.
    Memory: the labels and one batch."""
    labels = np.arange(n, dtype=np.int64)
    for batch in _batches([pairs] if isinstance(pairs, np.ndarray) else pairs, UNION_BATCH):
        u, v = batch[:, 0], batch[:, 1]
        ru, rv = _roots(labels, u), _roots(labels, v)
        open_ = ru != rv
        if open_.any():
            roots, local = np.unique(np.concatenate([ru[open_], rv[open_]]), return_inverse=True)
            labels[roots] = roots[_components(len(roots), local.reshape(2, -1).T)]
        # endpoints straight to their roots: short paths when the next batches meet them again
        labels[u], labels[v] = labels[ru], labels[rv]
    while True:  # pointer jumping until every label is a root
        jumped = labels[labels]
        if np.array_equal(jumped, labels):
            return labels
        labels = jumped


def resolve(
    n: int,
    near: np.ndarray | Iterable[np.ndarray],
    exact: np.ndarray,
    priority: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per document 0..n-1 (in input order): its bucket (KEPT, EXACT, NEAR) and the document
    kept for its component. `near`: the near-duplicate pairs, one array or streamed; `exact`
    pairs are (duplicate, first with the same text); per component the highest `priority` is
    kept, ties (and None) to the first."""
    near = [near] if isinstance(near, np.ndarray) else near
    root = union_find(n, itertools.chain([exact.astype(np.int64)], near))
    if priority is not None and n:  # (no documents with a pair: nothing to order)
        order = np.lexsort((np.arange(n), -priority, root))
        heads = order[np.r_[True, root[order][1:] != root[order][:-1]]]
        best = np.empty(n, dtype=np.int64)
        best[root[heads]] = heads
        root = best[root]
    text = np.arange(n)
    text[exact[:, 0]] = exact[:, 1]
    same_text = text == text[root]
    reason = np.where(root == np.arange(n), KEPT, np.where(same_text, EXACT, NEAR))
    return reason.astype(np.int8), root


def decide(
    short: np.ndarray,
    digests: np.ndarray,
    signatures: np.ndarray,
    bands: int,
    rows: int,
    exact: bool = True,
    *,
    verify: Callable[[np.ndarray], np.ndarray] | None = None,
    window: int = 0,
    priority: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The stage's decisions for documents held in memory, from the same pieces as the on-disk
    steps: per document its bucket and the document kept in its place (-1 when short).
    `digests` (16 bytes), `signatures`, the pairs `verify` gets and `priority` cover the
    documents that are not short, in order."""
    reason = np.full(len(short), SHORT, dtype=np.int8)
    keeper = np.full(len(short), -1, dtype=np.int64)
    cand = np.flatnonzero(~short)
    idx = np.arange(len(cand), dtype=np.int64)
    if len(cand) == 0:
        return reason, keeper
    text_keys = np.ascontiguousarray(digests).view(np.uint64).reshape(-1, 2)
    ex = bucket_pairs(text_keys[:, 0], text_keys[:, 1], idx) if exact else np.empty((0, 2), int)
    reps = np.ones(len(cand), dtype=bool)
    reps[ex[:, 0]] = False  # exact duplicates stay out of LSH: they would collide in every band
    keys = band_hashes(signatures[reps], bands, rows).reshape(-1, 2)
    near = bucket_pairs(keys[:, 0], keys[:, 1], np.repeat(idx[reps], bands), window)
    if verify is not None and len(near):
        near = near[verify(near)]
    mine, root = resolve(len(cand), near, ex, priority)
    reason[cand], keeper[cand] = mine, cand[root]
    return reason, keeper
