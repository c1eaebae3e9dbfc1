"""The training loader: seeded, resumable windows of any sequence length over one token stream.

The stream. The split's tokens are cut into blocks of `BLOCK_TOKENS` (fewer for small data, so
that there are at least 16), and each epoch of the stream is every block once, in a seeded
pseudo-random order that differs per epoch; the stream repeats epoch after epoch. Shuffling
blocks first makes every stretch of the stream a sample of the whole corpus: shards are in input
order (often one source after another), and without it a run's 8k stage would read only the last
sources. The data's tail of less than one block is not read (a few thousand tokens).

Stages. Each stage of a run owns a contiguous region of the stream starting at stream token
`region_start` (the trainer passes the tokens of the previous stages) and holding
`n_batches * global_batch` windows: window k covers stream tokens
[region_start + k*seq_len, region_start + (k+1)*seq_len + 1), inputs plus one shifted target, so
windows may span documents and blocks (as BTLM's packing spanned documents) and stages at
different `seq_len` cover adjacent regions that overlap only in that one shifted token.

Order. A region's windows are visited in a pseudo-random order: a bijection of [0, n_windows)
built as a balanced Feistel network on the smallest even-bit power of two >= n_windows, with
cycle walking (re-applying it until the value lands inside the range): O(1) memory and the same
order on every machine, for 10^3 or 10^11 windows alike. Keys come from blake2b of the seed and
the region (windows) or the epoch (blocks). Global batch b is permuted windows [b*G, (b+1)*G);
rank r of W takes rows [r*G/W, (r+1)*G/W) of it, so every world size sees the same global batches,
and `start_batch` resumes exactly.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterator

import numpy as np

from lmpipe.dataprep.shards import TokenShards

FEISTEL_ROUNDS = 6
BLOCK_TOKENS = 8192  # unit of the stream's shuffle; a 2,049-token window spans at most 2 blocks
MIN_BLOCKS = 16
TABLE_MAX = 1 << 18  # a permutation of at most this many values is kept as a table (2 MB)
BLOCK_ORDERS_KEPT = 64  # epochs' block orders a loader keeps (tables only for small data)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-mixing bijection of uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class WindowPermutation:
    """A seeded bijection of [0, n) evaluated on arrays of indices (Feistel + cycle walking)."""

    def __init__(self, n: int, key: bytes) -> None:
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = n
        # Two halves of `half` bits each: the domain 4**half is at most 4n, so cycle walking
        # takes fewer than 4 steps on average.
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half) - 1)
        digest = hashlib.blake2b(key, digest_size=8 * FEISTEL_ROUNDS).digest()
        self.keys = np.frombuffer(digest, dtype="<u8").astype(np.uint64)
        self._table: np.ndarray | None = None

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(self.half), x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << np.uint64(self.half)) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.n):
            raise IndexError(f"permutation index outside [0, {self.n})")
        if self.n <= TABLE_MAX:
            # A small domain (a mixture's small source, a short stage) is evaluated whole once and
            # then looked up: the same values, without a dozen numpy calls on a few indices.
            if self._table is None:
                self._table = self._walk(np.arange(self.n, dtype=np.int64))
            return self._table[index]
        return self._walk(index)

    def _walk(self, index: np.ndarray) -> np.ndarray:
        x = index.astype(np.uint64)
        with np.errstate(over="ignore"):
            x = self._feistel(x)
            out = x >= np.uint64(self.n)
            while out.any():
                x[out] = self._feistel(x[out])
                out = x >= np.uint64(self.n)
        return x.astype(np.int64)


class WindowLoader:
    """Batches of `seq_len + 1`-token windows from `data`, ordered by `seed` (see module doc)."""

    def __init__(self, data: TokenShards, seed: int, key: str = "") -> None:
        """`key` (a mixture's source name) sets this stream's orders apart from other streams of
        the same seed; "" keeps the single-folder orders."""
        if data.n_tokens < 2:
            raise ValueError(
                f"{data.folder}: split {data.split!r} holds too few tokens to train on"
            )
        self.data = data
        self.seed = seed
        self.key = f" source={key}" if key else ""
        self.block = max(1, min(BLOCK_TOKENS, data.n_tokens // MIN_BLOCKS))
        self.n_blocks = data.n_tokens // self.block
        self.epoch_tokens = self.n_blocks * self.block
        self._block_orders: collections.OrderedDict[int, WindowPermutation] = (
            collections.OrderedDict()
        )

    def epoch_windows(self, seq_len: int) -> int:
        """Windows of this length in one pass over the data (the stream wraps after it)."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        return self.epoch_tokens // seq_len

    def permutation(self, *, seq_len: int, region_start: int, n_windows: int) -> WindowPermutation:
        key = f"lmpipe-windows seed={self.seed} region_start={region_start} seq_len={seq_len}{self.key}"
        return WindowPermutation(n_windows, key.encode())

    def block_order(self, epoch: int) -> WindowPermutation:
        """Epoch `epoch`'s block order, from a small LRU: a stage that draws a source for many
        epochs (a small, upsampled one) reads windows of all of them in every batch."""
        order = self._block_orders.get(epoch)
        if order is None:
            key = f"lmpipe-blocks seed={self.seed} epoch={epoch}{self.key}"
            order = self._block_orders[epoch] = WindowPermutation(self.n_blocks, key.encode())
            if len(self._block_orders) > BLOCK_ORDERS_KEPT:
                self._block_orders.popitem(last=False)
        else:
            self._block_orders.move_to_end(epoch)
        return order

    def data_positions(self, positions: np.ndarray) -> np.ndarray:
        """The data token behind each stream position (vectorised; for checks and tools)."""
        positions = np.asarray(positions, dtype=np.int64)
        epoch, within = np.divmod(positions, self.epoch_tokens)
        block, offset = np.divmod(within, self.block)
        out = np.empty_like(positions)
        if not len(positions):
            return out
        # A read spans one epoch or two: a range, not np.unique's sort, finds them.
        for e in range(int(epoch.min()), int(epoch.max()) + 1):
            at = epoch == e
            if at.any():
                out[at] = self.block_order(e)(block[at]) * self.block + offset[at]
        return out

    def read_windows(
        self, positions: np.ndarray, out: np.ndarray, rows: np.ndarray | None = None
    ) -> None:
        """Fill row `rows[i]` of `out` (default: row i) with the stream's tokens from
        `positions[i]` on. The rows are cut into runs of consecutive data tokens (the rest of a
        block each), whose data positions are found in one vectorised call."""
        length = out.shape[1]
        positions = np.asarray(positions, dtype=np.int64)
        first_block = positions // self.block
        n_pieces = (length + self.block - 1) // self.block + 1
        block_starts = (first_block[:, None] + np.arange(n_pieces)) * self.block
        starts = np.maximum(positions[:, None], block_starts)
        stops = np.minimum(positions[:, None] + length, block_starts + self.block)
        data_starts = self.data_positions(starts.ravel()).reshape(starts.shape)
        targets = range(len(positions)) if rows is None else rows.tolist()
        for row, target in enumerate(targets):
            at = 0
            for piece in range(n_pieces):
                take = int(stops[row, piece] - starts[row, piece])
                if take <= 0:
                    break
                self.data.read_into(int(data_starts[row, piece]), out[target, at : at + take])
                at += take

    def batches(
        self,
        *,
        seq_len: int,
        global_batch: int,
        region_start: int,
        n_batches: int,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[np.ndarray]:
        """Yield this rank's int64 [global_batch // world_size, seq_len + 1] rows of batches
        start_batch .. n_batches-1 of the region."""
        if seq_len < 1 or global_batch < 1 or n_batches < 0 or region_start < 0:
            raise ValueError(
                f"bad batch request: seq_len={seq_len} global_batch={global_batch} "
                f"n_batches={n_batches} region_start={region_start}"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if global_batch % world_size:
            raise ValueError(
                f"global_batch {global_batch} is not divisible by world_size {world_size}"
            )
        if not 0 <= start_batch <= n_batches:
            raise ValueError(f"start_batch {start_batch} outside [0, {n_batches}]")
        if n_batches == 0:
            return
        local = global_batch // world_size
        perm = self.permutation(
            seq_len=seq_len, region_start=region_start, n_windows=n_batches * global_batch
        )
        for b in range(start_batch, n_batches):
            first = b * global_batch + rank * local
            windows = perm(np.arange(first, first + local, dtype=np.int64))
            out = np.empty((local, seq_len + 1), dtype=np.int64)
            self.read_windows(region_start + windows * seq_len, out)
            yield out
