"""Mixtures: training batches drawn from several token folders in proportion to their weights.

Which source fills a window slot. The slots of a stage are numbered k = 0, 1, 2, ... (global
batch b holds slots [b G, (b + 1) G)). Sources are taken in order, each with its conditional
share p_s = w_s / (w_s + the weights after it), as an integer quota of 2^40: source 0 takes slot
k when C_0(k + 1) > C_0(k), where C(n) = floor(p n + 1/2) counts its slots among the first n;
the slots it does not take are numbered anew (k - C_0(k)) and offered to source 1 the same way,
and so on; the last source takes what is left. Every count is a closed form of k: any batch of
any stage is computed on its own, so a resume is exact and every world size sees the same global
batches (rank r of W takes slots [b G + r G / W, b G + (r + 1) G / W)). Any stretch of S slots
holds within about one window per source of each source's share w_s S (the tests state the
bound), so a mixture is mixed at every step, not source after source.

Which window of the source. Source s owns its own stream (`loader.WindowLoader`: blocks in a
seeded order that changes every epoch) and, in each stage, its own region of it, after what the
earlier stages drew from it; the j-th slot the source fills in a stage reads window perm_s(j) of
that region, perm_s a seeded Feistel bijection (as for one folder). A source drawn past the end
of its data simply reads its next epoch (its own reshuffle); the others are not disturbed.

With one source this is exactly the single-folder loader: the same windows in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np

from lmpipe.dataprep.loader import WindowLoader
from lmpipe.dataprep.shards import TokenShards

QUOTA_BITS = 40
ONE = 1 << QUOTA_BITS  # a quota of ONE: every slot offered
# Slot numbers stay below 2^44 (17 trillion windows a stage), so that k * quota is computed
# exactly in uint64 by halves (`_taken`).
MAX_SLOTS = 1 << 44
_LOW = 21  # k = hi * 2^21 + lo: hi * quota < 2^63, lo * quota < 2^61


def quotas(weights: Sequence[float]) -> list[int]:
    """Each source's conditional share of the slots the sources before it leave, in 2^-40: never
    0 (a source with a weight is drawn, however little) nor all (it leaves some to the rest)."""
    top = max(weights, default=1.0)
    scaled = [w / top for w in weights]  # no overflow in the sums of huge weights
    rest = sum(scaled)
    out = []
    for w in scaled[:-1]:
        out.append(min(ONE - 1, max(1, round(w / rest * ONE))))
        rest -= w
    return [*out, ONE] if weights else []


@overload
def _taken(n: int, quota: int) -> int: ...
@overload
def _taken(n: np.ndarray, quota: int) -> np.ndarray: ...
def _taken(n: np.ndarray | int, quota: int) -> np.ndarray | int:
    """How many of the first n slots a source with this quota takes: floor(p n + 1/2), p =
    quota / 2^40, exactly (integers: the same on every machine)."""
    if isinstance(n, int):
        return (n * quota + (ONE >> 1)) >> QUOTA_BITS
    n = n.astype(np.uint64)
    q = np.uint64(quota)
    high = (n >> np.uint64(_LOW)) * q  # the product is high * 2^21 + low
    low = (n & np.uint64((1 << _LOW) - 1)) * q
    shift = np.uint64(QUOTA_BITS - _LOW)
    carry = ((high & np.uint64((1 << (QUOTA_BITS - _LOW)) - 1)) << np.uint64(_LOW)) + low
    carry += np.uint64(ONE >> 1)
    return ((high >> shift) + (carry >> np.uint64(QUOTA_BITS))).astype(np.int64)


def counts(n_slots: int, quota: list[int]) -> list[int]:
    """Slots each source fills among the first `n_slots` (they add up to n_slots)."""
    out, left = [], n_slots
    for q in quota:
        took = int(_taken(left, q))
        out.append(took)
        left -= took
    return out


def slot_sources(slots: np.ndarray, quota: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """For each slot (int64 array), its source and the number of slots that source filled
    before it (the slot's index within the source)."""
    k = slots.astype(np.int64)
    if len(k) and (k.min() < 0 or k.max() >= MAX_SLOTS):
        raise ValueError(f"slot numbers must lie in [0, 2^44), got {k.min()}..{k.max()}")
    source = np.full(len(k), -1, dtype=np.int64)
    index = np.zeros(len(k), dtype=np.int64)
    open_ = np.ones(len(k), dtype=bool)
    for s, q in enumerate(quota):
        kk = k[open_]
        before = _taken(kk, q)
        takes = _taken(kk + 1, q) > before
        where = np.flatnonzero(open_)
        source[where[takes]] = s
        index[where[takes]] = before[takes]
        k[where[~takes]] = kk[~takes] - before[~takes]  # its number among the slots left over
        open_[where[takes]] = False
    return source, index


@dataclass(frozen=True)
class StageSource:
    """What a stage draws from one source: its quota, where its region starts in the source's
    stream, and how many windows the stage takes from it."""

    name: str
    quota: int
    region_start: int
    windows: int


class MixtureLoader:
    """Batches of `seq_len + 1`-token windows drawn from named sources (see the module doc)."""

    def __init__(self, sources: dict[str, TokenShards], seed: int) -> None:
        # One source keeps the single-folder loader's keys: the same run as before mixtures.
        single = len(sources) == 1
        self.loaders = {
            name: WindowLoader(shards, seed, key="" if single else name)
            for name, shards in sources.items()
        }

    def epoch_windows(self, name: str, seq_len: int) -> int:
        return self.loaders[name].epoch_windows(seq_len)

    def batches(
        self,
        *,
        seq_len: int,
        global_batch: int,
        sources: Sequence[StageSource],
        n_batches: int,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[np.ndarray]:
        """This rank's int64 [global_batch // world_size, seq_len + 1] rows of batches
        start_batch .. n_batches-1 of a stage."""
        if global_batch % world_size or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of {world_size} cannot split a batch of {global_batch}")
        if not 0 <= start_batch <= n_batches:
            raise ValueError(f"start_batch {start_batch} outside [0, {n_batches}]")
        quota = [s.quota for s in sources]
        perms = {
            s.name: self.loaders[s.name].permutation(
                seq_len=seq_len, region_start=s.region_start, n_windows=s.windows
            )
            for s in sources
            if s.windows
        }
        local = global_batch // world_size
        for b in range(start_batch, n_batches):
            first = b * global_batch + rank * local
            source, index = slot_sources(np.arange(first, first + local, dtype=np.int64), quota)
            out = np.empty((local, seq_len + 1), dtype=np.int64)
            for s, src in enumerate(sources):
                rows = np.flatnonzero(source == s)
                if len(rows):
                    windows = perms[src.name](index[rows])
                    positions = src.region_start + windows * seq_len
                    self.loaders[src.name].read_windows(positions, out, rows)
            yield out
