"""Benchmark the mixture loader against the single-folder loader, on the same tokens.

    TIKTOKEN_CACHE_DIR=/tmp/tk python benchmarks/loader_bench.py [--mb 13] [--repeats 3]

Corpus: the Python standard library's own sources (benchmarks/tokenize_bench.py), each file given
one of seven source names by a hash of its path, tokenized twice: into one folder, and with
`--split-by-field source` into seven (so the mixture's sources are uneven, as real ones are).
Reports windows per second at 2,048 and 8,192 tokens, at BTLM's global batches and at small ones,
for the one folder (WindowLoader) and for the seven-source mixture (MixtureLoader) weighted as
SlimPajama-627B's token shares (seeds-spec 5.2).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

from tokenize_bench import best, stdlib_texts

from lmpipe.dataprep.loader import WindowLoader
from lmpipe.dataprep.mixture import MixtureLoader, StageSource, counts, quotas
from lmpipe.dataprep.shards import TokenShards
from lmpipe.dataprep.tokenize import tokenize

# SlimPajama-627B's token shares (seeds-spec 5.2, card column)
SLIMPAJAMA = {
    "CommonCrawl": 0.522,
    "C4": 0.267,
    "GitHub": 0.052,
    "Books": 0.042,
    "ArXiv": 0.046,
    "Wikipedia": 0.038,
    "StackExchange": 0.033,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=13.0, help="corpus size in MB of text")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    texts = stdlib_texts(int(args.mb * 1e6))
    names = list(SLIMPAJAMA)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "corpus.jsonl"
        with open(src, "w", encoding="utf-8") as f:
            for i, text in enumerate(texts):
                source = names[hashlib.blake2b(str(i).encode(), digest_size=1).digest()[0] % 7]
                f.write(json.dumps({"text": text, "source": source}) + "\n")
        tokenize([src], Path(tmp) / "one", holdout=0.0)
        split = tokenize([src], Path(tmp) / "seven", holdout=0.0, split_by_field="source")
        sizes = {f: s["tokens"] for f, s in split["sources"].items()}
        print(f"corpus: {len(texts)} documents; sources (tokens): {sizes}")
        single = WindowLoader(TokenShards(Path(tmp) / "one"), seed=0)
        mixture = MixtureLoader({n: TokenShards(Path(tmp) / "seven" / n) for n in names}, seed=0)
        quota = quotas([SLIMPAJAMA[n] for n in names])
        # BTLM's global batches (1,920 x 2,048, 480 x 8,192), and small ones where the mixture's
        # fixed cost a batch and source weighs most.
        for seq_len, global_batch, n in ((2048, 1920, 10), (8192, 480, 10), (2048, 64, 100), (8192, 16, 100)):  # fmt: skip
            windows = counts(n * global_batch, quota)
            sources = [StageSource(name, q, 0, w) for name, q, w in zip(names, quota, windows, strict=True)]  # fmt: skip
            one = best(
                lambda s=seq_len, g=global_batch, n=n: sum(
                    len(b) for b in single.batches(seq_len=s, global_batch=g, region_start=0, n_batches=n)
                ),
                args.repeats,
            )  # fmt: skip
            mixed = best(
                lambda s=seq_len, g=global_batch, src=sources, n=n: sum(
                    len(b) for b in mixture.batches(seq_len=s, global_batch=g, sources=src, n_batches=n)
                ),
                args.repeats,
            )  # fmt: skip
            total = n * global_batch
            print(
                f"seq_len {seq_len:,}, {global_batch:,} a batch: one folder {total / one:,.0f} windows/s "
                f"({total * seq_len / one / 1e6:.0f}M tokens/s); seven-source mixture "
                f"{total / mixed:,.0f} windows/s ({total * seq_len / mixed / 1e6:.0f}M tokens/s), "
                f"{mixed / one:.2f}x the time"
            )


if __name__ == "__main__":
    main()
