"""Benchmark `lmpipe tokenize` against tiktoken's raw ceiling, and the window loader.

    TIKTOKEN_CACHE_DIR=/tmp/tk python benchmarks/tokenize_bench.py [--mb 13] [--repeats 3]

Corpus: the Python standard library's own source files (real text every installation has), as
one `.jsonl.zst`. Reports, best of `--repeats` on the same input: tiktoken `encode_ordinary_batch`
over the texts already in memory (the ceiling) and `tokenize` end to end (read .jsonl.zst, hash,
encode, write shards), at 1 and 2 threads/workers; then loader windows per second at 2,048 and
8,192 tokens over the shards just written.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import tempfile
import time
from pathlib import Path

import zstandard

from lmpipe.dataprep.loader import WindowLoader
from lmpipe.dataprep.shards import TokenShards
from lmpipe.dataprep.tokenize import tokenize
from lmpipe.dataprep.tokenizer import get_encoding


def stdlib_texts(limit_bytes: int) -> list[str]:
    texts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text.encode())
        if total >= limit_bytes:
            break
    return texts


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=13.0, help="corpus size in MB of text")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    texts = stdlib_texts(int(args.mb * 1e6))
    n_bytes = sum(len(t.encode()) for t in texts)
    enc = get_encoding()
    n_tokens = sum(map(len, enc.encode_ordinary_batch(texts)))
    print(f"corpus: {len(texts)} documents, {n_bytes / 1e6:.1f} MB, {n_tokens:,} tokens")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "corpus.jsonl.zst"
        lines = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
        src.write_bytes(zstandard.ZstdCompressor(level=3).compress(lines))
        for n in (1, 2):
            ceiling = best(
                lambda n=n: enc.encode_ordinary_batch(texts, num_threads=n), args.repeats
            )
            out = Path(tmp) / f"tok{n}"
            run = best(
                lambda n=n, out=out: tokenize([src], out, overwrite=True, workers=n),
                args.repeats,
            )
            print(
                f"{n} thread(s): tiktoken ceiling {n_tokens / ceiling / 1e6:.2f}M tok/s "
                f"({n_bytes / ceiling / 1e6:.1f} MB/s); lmpipe tokenize "
                f"{n_tokens / run / 1e6:.2f}M tok/s ({n_bytes / run / 1e6:.1f} MB/s) = "
                f"{ceiling / run:.0%} of the ceiling"
            )
        loader = WindowLoader(TokenShards(Path(tmp) / "tok1"), seed=0)
        n_batches = 40
        for seq_len, global_batch in ((2048, 64), (8192, 16)):
            elapsed = best(
                lambda s=seq_len, g=global_batch: sum(
                    len(b)
                    for b in loader.batches(
                        seq_len=s, global_batch=g, region_start=0, n_batches=n_batches
                    )
                ),
                args.repeats,
            )
            windows = n_batches * global_batch
            print(
                f"loader seq_len {seq_len}: {windows / elapsed:,.0f} windows/s "
                f"({windows * seq_len / elapsed / 1e6:.0f}M tokens/s)"
            )


if __name__ == "__main__":
    main()
