"""Benchmark `lmpipe tokenize` against tiktoken's raw ceiling, and the window loader.

    TIKTOKEN_CACHE_DIR=/tmp/tk python benchmarks/tokenize_bench.py [--mb 13] [--repeats 3]

Corpus: the Python standard library's own source files (real text every installation has), as
one `.jsonl.zst`. Reports, best of `--repeats` on the same input: tiktoken `encode_ordinary_batch`
over the texts already in memory (the ceiling) and `tokenize` end to end (read .jsonl.zst, hash,
encode, write shards), at 1 and 2 encoding threads/workers; then loader windows per second at
2,048 and 8,192 tokens over the shards just written.

Both are timed in wall-clock seconds and in the process's CPU seconds (all threads): with one
worker, `tokenize` reads and parses the next documents on the main thread while one thread
encodes, so it uses a little more than one core; the CPU column compares the work per core. The
shards' tokens are checked equal to tiktoken's (`encode_ordinary` + end-of-text per document), so
a fast path that encodes wrongly cannot win.
"""

from __future__ import annotations

import argparse
import json
import resource
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
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


def cpu_seconds() -> float:
    """User + system CPU time of this process, every thread included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def best(fn, repeats: int) -> float:
    return best_with_cpu(fn, repeats)[0]


def best_with_cpu(fn, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the fastest of `repeats` calls by wall clock."""
    runs = []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), cpu_seconds()
        fn()
        runs.append((time.perf_counter() - start, cpu_seconds() - start_cpu))
    return min(runs)


def check_tokens(folder: Path, texts: list[str], enc) -> None:
    """The shards hold exactly tiktoken's tokens of each document: every document, in input
    order, in the training split or (tokenize's default holdout) the held-out one."""
    splits = [iter(TokenShards(folder, split).documents()) for split in ("train", "heldout")]
    heads = [next(s, None) for s in splits]
    for i, ids in enumerate(enc.encode_ordinary_batch(texts)):
        want = np.asarray(ids, dtype=np.uint16)
        k = next(
            (k for k, h in enumerate(heads) if h is not None and np.array_equal(h, want)), None
        )
        if k is None:
            raise SystemExit(f"{folder}: document {i}'s tokens differ from tiktoken's")
        heads[k] = next(splits[k], None)
    if heads != [None, None]:
        raise SystemExit(f"{folder}: the shards hold documents the corpus does not")


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
            ceiling, ceiling_cpu = best_with_cpu(
                lambda n=n: enc.encode_ordinary_batch(texts, num_threads=n), args.repeats
            )
            out = Path(tmp) / f"tok{n}"
            run, run_cpu = best_with_cpu(
                lambda n=n, out=out: tokenize([src], out, overwrite=True, workers=n),
                args.repeats,
            )
            check_tokens(out, texts, enc)
            print(
                f"{n} encoding thread(s): tiktoken ceiling {n_tokens / ceiling / 1e6:.2f}M tok/s "
                f"({n_bytes / ceiling / 1e6:.1f} MB/s, {ceiling_cpu / ceiling:.2f} cores); "
                f"lmpipe tokenize {n_tokens / run / 1e6:.2f}M tok/s "
                f"({n_bytes / run / 1e6:.1f} MB/s, {run_cpu / run:.2f} cores) = "
                f"{ceiling / run:.0%} of the ceiling by wall clock, "
                f"{ceiling_cpu / run_cpu:.0%} per CPU second"
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
