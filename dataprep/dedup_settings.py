"""The settings of one `lmpipe dedup` run: one frozen, typed object, validated when it is made.

It is passed whole to every step (each worker reads what it needs), gives the manifest's
`settings` (`manifest()`) and, through them, the resume fingerprint; the CLI's option defaults are
its field defaults (tests/dataprep/test_dedup_settings.py checks that they agree). Adding a setting
is one field here, its check, its manifest entry and the code that reads it.

Fields in three groups: what the stage does to the text (its output depends on them), how much
of its work it does (`fixer`: ftfy's code or lmpipe's equivalent, same text), and how the work is
spread (`workers`, `engine`, `part_entries`): none of the last four changes the output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Literal

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.textfix import fix_text, fix_text_reference

# The module stays light (no numpy): the CLI reads its defaults when it starts.
if TYPE_CHECKING:
    from lmpipe.dataprep.minhash import MinHasher, OnePermHasher

# Keys an exact or lsh partition holds (24 bytes each, plus the sort's copies): ~100 MB a task.
PART_ENTRIES = 1 << 22
FIXERS = ("lmpipe", "ftfy")
# The MinHash permutations' seed: fixed, so that runs are comparable signature for signature.
SEED = 1
# `lmpipe dedup`'s name for a field, where it is not --FIELD-NAME: errors name the flag a user
# typed (part_entries, a test knob, has none).
FLAGS = {
    "fix": "--fix-text",
    "hash_scheme": "--hash",
    "workers": "-j",
    "part_entries": "part_entries",
}
# --hash's names: sha1 (datasketch 1.5.9's, SlimPajama's) is the scheme minhash.py calls legacy.
HASH_NAMES = {"oph": "oph", "sha1": "legacy", "affine32": "affine32"}


@dataclass(frozen=True)
class DedupSettings:
    """SlimPajama's defaults: ftfy NFC, 200-character short filter, exact then near duplicates
    at character 13-gram Jaccard 0.8 with 128 permutations (seeds-spec 5.1)."""

    # --- what is done: the output depends on these ---
    min_chars: int = 200  # short filter on the normalised text; 0: none
    fix: bool = True  # ftfy.fix_text(NFC) each text first; False: texts pass byte for byte
    exact: bool = True  # exact duplicates of the normalised text first
    near: bool = True  # near duplicates: MinHash-LSH (and verification)
    threshold: float = 0.8
    num_perm: int = 128
    ngram: int = 13
    hash_scheme: str = "oph"  # "oph", "legacy" (datasketch 1.5.9's sha1; or "sha1") or "affine32"
    verify: bool = True  # keep only candidate pairs whose exact Jaccard reaches `threshold`
    lsh_threshold: float | None = None  # None: threshold - 0.2 with verify, else threshold
    keep: Literal["first", "longest"] = "first"
    holdout: float = 0.0
    holdout_seed: int = 42
    decontaminate_field: str = "text"
    decontaminate_ngrams: int = 0
    source_field: str | None = None
    strict: bool = False
    # --- how the text fix is computed: the same text either way ---
    fixer: Literal["lmpipe", "ftfy"] = "lmpipe"
    # --- how the work is spread: never the output ---
    workers: int = 1
    engine: str = "local"
    part_entries: int = PART_ENTRIES

    def __post_init__(self) -> None:
        from lmpipe.dataprep.runner import ENGINES

        # The CLI's name, so that Python and the command line take the same words.
        object.__setattr__(self, "hash_scheme", HASH_NAMES.get(self.hash_scheme, self.hash_scheme))
        problems = [
            (self.min_chars >= 0, "min_chars", "0 or more"),
            (self.ngram >= 1, "ngram", "at least 1"),
            (self.num_perm >= 2, "num_perm", "at least 2"),
            (0.0 < self.threshold < 1.0, "threshold", "between 0 and 1"),
            (
                self.lsh_threshold is None or 0.0 < self.lsh_threshold < 1.0,
                "lsh_threshold",
                "between 0 and 1",
            ),
            (self.hash_scheme in HASH_NAMES.values(), "hash_scheme", _one_of(HASH_NAMES)),
            (self.keep in ("first", "longest"), "keep", "first or longest"),
            (0.0 <= self.holdout < 1.0, "holdout", "0 or more and under 1 (SlimPajama: 0.0017)"),
            (bool(self.decontaminate_field), "decontaminate_field", "a field name"),
            (self.source_field != "", "source_field", "a field name"),
            (0 <= self.decontaminate_ngrams <= 64, "decontaminate_ngrams", "0 to 64"),
            (self.fixer in FIXERS, "fixer", _one_of(FIXERS)),
            (self.workers >= 1, "workers", "at least 1"),
            (self.engine in ENGINES, "engine", _one_of(ENGINES)),
            (self.part_entries >= 1, "part_entries", "at least 1"),
        ]
        failed = [
            f"{_flag(name)} {getattr(self, name)!r}: {need}"
            for ok, name, need in problems
            if not ok
        ]
        if failed:
            raise LmpipeError("; ".join(failed))

    @property
    def lsh(self) -> float:
        """The Jaccard the LSH bands are tuned for. With verification, 0.2 under the threshold:
        LSH then misses almost no true pair and verification drops the extra candidates (recall
        0.999, precision 1.0 on benchmarks/dedup_bench.py, where 0.8 gave 0.87)."""
        if self.lsh_threshold is not None:
            return self.lsh_threshold
        return max(0.05, self.threshold - 0.2) if self.verify else self.threshold

    @property
    def bands_rows(self) -> tuple[int, int]:
        """LSH bands and rows per band for `lsh` (`minhash.optimal_bands`)."""
        from lmpipe.dataprep.minhash import optimal_bands

        return optimal_bands(self.lsh, self.num_perm)

    def hasher(self) -> MinHasher | OnePermHasher | None:
        """The signature scheme (None without the near-duplicate step); one per process."""
        return _hasher(self.hash_scheme, self.num_perm) if self.near else None

    def fixer_fn(self) -> Callable[[str], str] | None:
        """The text fix (None without `fix`): lmpipe's exact equivalent of ftfy, or ftfy."""
        if not self.fix:
            return None
        return fix_text if self.fixer == "lmpipe" else fix_text_reference

    def manifest(self) -> dict[str, Any]:
        """The manifest's `settings`: what the output depends on, as earlier releases wrote it
        (a run without the near step names none of its settings)."""
        bands, rows = self.bands_rows
        near: dict[str, float | str | None] = {
            "threshold": self.threshold, "num_perm": self.num_perm, "ngram": self.ngram,
            "bands": bands, "rows": rows, "lsh_threshold": self.lsh, "verify": self.verify,
            "hash": "fnv1a64+fmix64" if self.hash_scheme == "oph" else "sha1_hash32",
            "hash_scheme": self.hash_scheme, "seed": SEED,
        }  # fmt: skip
        if not self.near:
            near = dict.fromkeys(near)
        return {
            "min_chars": self.min_chars, **near, "exact": self.exact, "near": self.near,
            "keep": self.keep, "strict": self.strict,
            "fix_text": "ftfy.fix_text(normalization='NFC')" if self.fix else None,
            "holdout": self.holdout, "holdout_seed": self.holdout_seed,
            "decontaminate_field": self.decontaminate_field,
            "decontaminate_ngrams": self.decontaminate_ngrams, "source_field": self.source_field,
            "text_hash": "sha256(fixed text, utf-8)" if self.fix else "sha256(text, utf-8)",
        }  # fmt: skip


def _flag(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def _one_of(names: Iterable[str]) -> str:
    """`a, b or c`."""
    *rest, last = names
    return f"{', '.join(rest)} or {last}" if rest else last


@cache
def _hasher(scheme: str, num_perm: int) -> MinHasher | OnePermHasher:
    from lmpipe.dataprep.minhash import make_hasher

    return make_hasher(scheme, num_perm, seed=SEED)
