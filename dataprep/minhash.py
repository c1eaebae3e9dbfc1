"""MinHash signatures of character n-gram sets, and the LSH band layout for a Jaccard threshold.

Two families of signature, one interface (`hasher.shingles(text)` -> array, `hasher.signatures(list
of arrays)` -> (documents, num_perm) uint32):

- `MinHasher(scheme="legacy")` (datasketch < 2.0, SlimPajama's datasketch 1.5.9) and "affine32"
  (datasketch 2.0): sha1_hash32 of each shingle, then `num_perm` universal permutations, value for
  value equal to `datasketch.MinHash(num_perm, seed)`. 128 permutations of every shingle are the
  cost: about 3/4 of the stage's CPU time.
- `OnePermHasher` ("oph", lmpipe's fast scheme): one 64-bit hash per shingle, computed vectorised
  over the text's code points; the hash's high bits pick one of `num_perm` bins, its low 32 bits
  are the value, each bin keeps its minimum (one-permutation hashing, Li, Owen and Zhang 2012), and
  empty bins borrow a non-empty bin's value along a seeded probe sequence shared by all documents
  (optimal densification, Shrivastava 2017), so P(equal bin) stays the Jaccard. One hash per
  shingle instead of 128 permutations. Not datasketch-compatible; its decisions are checked against
  an exact truth by benchmarks/dedup_bench.py.

`normalise` is SlimPajama's clean(), shared by the short filter and the shingles. The band keys,
candidate pairs and their components are `clusters.py`'s.
"""

from __future__ import annotations

import functools
import hashlib
import re
import string
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from lmpipe.dataprep.errors import LmpipeError

_PUNCTUATION = str.maketrans("", "", string.punctuation)
# The same deletion as a regex: str.translate has a fast path for ASCII text only, and on other
# text a regex substitution is ~5x faster (0.18 s against 0.94 s for 10k non-ASCII documents).
_PUNCTUATION_RE = re.compile("[" + re.escape(string.punctuation) + "]")
_WHITESPACE = re.compile(r"\s+")
# A text longer than this is normalised without a word list and hashed a piece at a time
# (`text_pieces`): one 40 MB document then costs a few times its size, not fifty.
LONG_TEXT_CHARS = 1 << 20

# datasketch's constants (minhash.py): the legacy scheme permutes within the Mersenne prime 2^61-1
# and keeps the low 32 bits.
MERSENNE_PRIME = np.uint64((1 << 61) - 1)
MAX_HASH = np.uint64((1 << 32) - 1)
SCHEMES = ("legacy", "affine32", "oph")
# Shingles permuted at once: 8192 x 128 x 8 bytes = 8 MiB per temporary, cache-friendly enough.
_CHUNK_ROWS = 1 << 13


def normalised_words(text: str) -> list[str]:
    """The words of SlimPajama's clean() text: lowercase, ASCII punctuation deleted, split on
    whitespace runs."""
    # str.split() splits on exactly the characters re's \s matches in a str pattern (both use
    # Py_UNICODE_ISSPACE), and drops the ends, so joining these with one space equals
    # re.sub(r"\s+", " ", t).strip().
    text = text.lower()
    if text.isascii():
        return text.translate(_PUNCTUATION).split()
    return _PUNCTUATION_RE.sub("", text).split()


def normalise(text: str) -> str:
    """SlimPajama's clean(): lowercase, delete ASCII punctuation, one space per whitespace run."""
    if len(text) <= LONG_TEXT_CHARS:
        return " ".join(normalised_words(text))
    # A long text a piece at a time, cut inside whitespace runs: the same string without a list
    # of every word of it (~60 bytes a word). Lowercasing looks across no whitespace (Final_Sigma
    # ends at it), and re's \s matches exactly the characters str.split() splits on (all of
    # Unicode checked), so the pieces' words are the text's words.
    parts, start = [], 0
    while start < len(text):
        gap = _WHITESPACE.search(text, start + LONG_TEXT_CHARS)
        stop = gap.start() if gap else len(text)
        words = normalised_words(text[start:stop])
        if words:
            parts.append(" ".join(words))
        start = gap.end() if gap else len(text)
    return " ".join(parts)


def text_pieces(text: str, ngram: int, piece: int | None = None) -> Iterator[str]:
    """`text` itself, or for a text longer than `piece` characters (default LONG_TEXT_CHARS)
    pieces that overlap by ngram - 1 characters: together they hold exactly the text's n-grams,
    so a set or a minimum over the pieces is the text's own, at the memory of one piece."""
    piece = piece or LONG_TEXT_CHARS
    if len(text) <= piece:
        yield text
        return
    for start in range(0, len(text) - ngram + 1, piece):
        yield text[start : start + piece + ngram - 1]


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """datasketch's sha1_hash32 of each distinct character n-gram of `text` (UTF-8), as uint32.

    A text shorter than `ngram` has no n-grams; SlimPajama's code gave it an empty (all-max)
    signature, which would make every such text a duplicate of every other. We use the whole string
    as its one shingle instead. With the default `min_chars` (200 > 13) this never happens.
    """
    if len(text) < ngram:
        grams: Iterable[str] = (text,)
    else:
        # A set: min over permutations is the same for repeated shingles, and hashing is the cost.
        grams = {text[i : i + ngram] for i in range(len(text) - ngram + 1)}
    sha1 = hashlib.sha1
    digests = b"".join([sha1(g.encode("utf-8")).digest() for g in grams])
    # sha1_hash32 = struct.unpack("<I", digest[:4]): the first little-endian word of each digest.
    return np.frombuffer(digests, dtype="<u4").reshape(-1, 5)[:, 0].copy()


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, datasketch 2.0's pre-mix for its affine32 scheme."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


class MinHasher:
    """Vectorised MinHash, value for value equal to `datasketch.MinHash(num_perm, seed, scheme=..)`.

    `scheme="legacy"` is the only scheme of datasketch < 2.0 (SlimPajama pinned 1.5.9), so its
    signatures reproduce SlimPajama's decisions; "affine32" is datasketch 2.0's default.
    """

    def __init__(self, num_perm: int = 128, seed: int = 1, scheme: str = "legacy"):
        if scheme not in SCHEMES:
            raise LmpipeError(f"hash scheme must be one of {', '.join(SCHEMES)}, not {scheme!r}")
        if scheme == "oph":
            raise LmpipeError("the oph scheme is OnePermHasher's: use make_hasher")
        self.num_perm, self.seed, self.scheme = num_perm, seed, scheme
        # Same generator, same draw order as datasketch's MinHash._init_permutations.
        gen = np.random.RandomState(seed)
        if scheme == "legacy":
            pairs = [
                (
                    gen.randint(1, MERSENNE_PRIME, dtype=np.uint64),
                    gen.randint(0, MERSENNE_PRIME, dtype=np.uint64),
                )
                for _ in range(num_perm)
            ]
            self.a, self.b = np.array(pairs, dtype=np.uint64).T.copy()
        else:
            self.a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(
                1
            )
            self.b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)

    def shingles(self, text: str, ngram: int) -> np.ndarray:
        return shingle_hashes(text, ngram)

    def _permute(self, hv: np.ndarray) -> np.ndarray:
        """(shingles,) sha1_hash32 values -> (num_perm, shingles) permuted values as uint32.

        Permutations along the first axis, so the per-document minimum runs over contiguous rows;
        the arithmetic is in place because the temporaries, not the multiplies, cost the time."""
        if self.scheme == "affine32":
            x = _fmix32(hv.astype(np.uint32))[None, :] * self.a[:, None]
            x += self.b[:, None]  # wraps modulo 2^32, as datasketch's uint32 arithmetic does
            return x
        # a * h overflows 64 bits; datasketch computes it in numpy uint64, which wraps modulo 2^64
        # before the % prime. We do the same arithmetic, so the values agree bit for bit.
        x = self.a[:, None] * hv.astype(np.uint64)[None, :]
        x += self.b[:, None]
        # x % (2^61 - 1) without a division: x = hi * 2^61 + lo == hi + lo (mod 2^61 - 1), and
        # hi + lo < 2 * (2^61 - 1), so one conditional subtraction finishes it.
        y = x & MERSENNE_PRIME
        x >>= np.uint64(61)
        y += x
        np.subtract(y, MERSENNE_PRIME, out=y, where=y >= MERSENNE_PRIME)
        y &= MAX_HASH
        return y.astype(np.uint32)

    def signatures(self, hashes: Sequence[np.ndarray]) -> np.ndarray:
        """One signature row (uint32, num_perm) per document, from each one's shingle hashes."""
        return self.finish(self.minima(hashes))

    def finish(self, minima: np.ndarray) -> np.ndarray:
        """A MinHash signature is its minima; the minimum over a text's pieces is the text's."""
        return minima

    def minima(self, hashes: Sequence[np.ndarray]) -> np.ndarray:
        out = np.full((len(hashes), self.num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
        if not hashes:
            return out
        lengths = np.array([len(h) for h in hashes])
        doc = np.repeat(np.arange(len(hashes)), lengths)
        hv = np.concatenate(hashes)
        # Chunks of shingles bound memory for any document size; a document cut by a chunk
        # boundary gets the minimum of its parts.
        for start in range(0, len(hv), _CHUNK_ROWS):
            phv = self._permute(hv[start : start + _CHUNK_ROWS])
            seg = doc[start : start + _CHUNK_ROWS]
            firsts = np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]])
            rows = seg[firsts]
            out[rows] = np.minimum(out[rows], np.minimum.reduceat(phv, firsts, axis=1).T)
        return out


def optimal_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising false positive + false negative area, as datasketch's
    `_optimal_param(threshold, num_perm, 0.5, 0.5)` chooses: 0.8 and 128 give (9, 13)."""
    # P(candidate | J=s) = 1 - (1 - s^r)^b is a polynomial of degree b*r <= num_perm, so
    # Gauss-Legendre with more than num_perm/2 nodes integrates it exactly (datasketch: scipy quad).
    x, w = np.polynomial.legendre.leggauss(num_perm // 2 + 2)
    s_lo, w_lo = threshold / 2 * (x + 1), w * threshold / 2
    s_hi, w_hi = threshold + (1 - threshold) / 2 * (x + 1), w * (1 - threshold) / 2
    best, opt = float("inf"), (0, 0)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = float(np.dot(w_lo, 1 - (1 - s_lo**r) ** b))
            fn = float(np.dot(w_hi, (1 - s_hi**r) ** b))
            if 0.5 * fp + 0.5 * fn < best:
                best, opt = 0.5 * fp + 0.5 * fn, (b, r)
    return opt


# --- the fast scheme ------------------------------------------------------------------------------

_FNV_PRIME = np.uint64(0x100000001B3)
_FNV_BASIS = np.uint64(0xCBF29CE484222325)


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer: every output bit depends on every input bit."""
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


def fast_shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """A 64-bit hash of every character n-gram of `text` (with repeats), vectorised: FNV-1a over
    the n code points of each window, then fmix64. A text shorter than `ngram` is its one shingle.

    Distinct n-grams collide with probability ~2^-64 per pair, so Jaccard on these hashes equals
    Jaccard on the n-grams for every practical corpus (the verify step relies on it)."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.uint64)
    n = min(ngram, len(cp))
    count = len(cp) - n + 1
    h = np.full(count, _FNV_BASIS, dtype=np.uint64)
    for k in range(n):  # n vector passes over the text instead of a Python loop per shingle
        h ^= cp[k : k + count]
        h *= _FNV_PRIME
    return fmix64(h)


class OnePermHasher:
    """One-permutation MinHash with optimal densification over `fast_shingle_hashes`."""

    scheme = "oph"
    _PROBES = 64  # P(all 64 probes hit empty bins) < 1e-19 while at most half the bins are empty

    def __init__(self, num_perm: int = 128, seed: int = 1):
        self.num_perm, self.seed = num_perm, seed
        gen = np.random.RandomState(seed)
        # probe[t, i]: the bin an empty bin i looks at on try t, the same for every document.
        self.probe = gen.randint(0, num_perm, (self._PROBES, num_perm))
        self.salt = np.uint64(gen.randint(0, 1 << 62, dtype=np.int64))

    def shingles(self, text: str, ngram: int) -> np.ndarray:
        return fast_shingle_hashes(text, ngram)

    def signatures(self, hashes: Sequence[np.ndarray]) -> np.ndarray:
        return self.finish(self.minima(hashes))

    def minima(self, hashes: Sequence[np.ndarray]) -> np.ndarray:
        """Each document's minimum per bin (empty bins at the uint32 maximum); the minimum over a
        text's pieces is the text's."""
        out = np.full((len(hashes), self.num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
        if not hashes:
            return out
        lengths = np.array([len(h) for h in hashes])
        doc = np.repeat(np.arange(len(hashes)), lengths)
        h = fmix64(np.concatenate(hashes) ^ self.salt)  # the seed picks the permutation
        # Bin by multiply-shift on the high 32 bits (any num_perm), value: the low 32 bits.
        bins = ((h >> np.uint64(32)) * np.uint64(self.num_perm)) >> np.uint64(32)
        np.minimum.at(out.ravel(), doc * self.num_perm + bins.astype(np.int64), h.astype(np.uint32))
        return out

    def finish(self, out: np.ndarray) -> np.ndarray:
        """Fill each empty bin from the bins its probe sequence visits (densification)."""
        empty = np.iinfo(np.uint32).max
        holes = out == empty
        if holes.any():
            filled = out.copy()
            rows, cols = np.nonzero(holes)
            for t in range(self._PROBES):
                borrowed = out[rows, self.probe[t, cols]]
                ok = borrowed != empty
                filled[rows[ok], cols[ok]] = borrowed[ok]
                rows, cols = rows[~ok], cols[~ok]
                if len(rows) == 0:
                    break
            out = filled
        return out


def long_signature(
    hasher: MinHasher | OnePermHasher, text: str, ngram: int, piece: int | None = None
) -> np.ndarray:
    """`hasher.signatures([hasher.shingles(text, ngram)])`, value for value, one piece of the
    text at a time (`text_pieces`)."""
    pieces = (
        hasher.minima([hasher.shingles(part, ngram)]) for part in text_pieces(text, ngram, piece)
    )
    return hasher.finish(functools.reduce(np.minimum, pieces))


def distinct_shingles(text: str, ngram: int, piece: int | None = None) -> np.ndarray:
    """`np.unique(fast_shingle_hashes(text, ngram))`, one piece of the text at a time."""
    parts = [
        np.unique(fast_shingle_hashes(part, ngram)) for part in text_pieces(text, ngram, piece)
    ]
    if len(parts) == 1:
        return parts[0]
    hashes = np.concatenate(parts)
    del parts
    hashes.sort()  # in place: np.unique would sort a copy
    return hashes[np.r_[True, hashes[1:] != hashes[:-1]]]


def make_hasher(scheme: str, num_perm: int, seed: int = 1) -> MinHasher | OnePermHasher:
    if scheme == "oph":
        return OnePermHasher(num_perm, seed)
    return MinHasher(num_perm, seed, scheme)
