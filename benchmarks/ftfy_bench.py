"""lmpipe's text fix against ftfy itself, on the dedup benchmark corpora: identical output, and
how much faster.

    python benchmarks/ftfy_bench.py [--corpus code,web] [--scale 1] [--workdir /tmp/lmpipe-dedup-bench]

For every document of each corpus (built and cached by `dedup_corpus.py`, as `dedup_bench.py`
uses it): `ftfy.fix_text(text, normalization="NFC")` and `lmpipe.dataprep.textfix.fix_text(text)`,
compared byte for byte (exit status 1 on any difference), each timed over the whole corpus on one
core. Printed per corpus: documents, MB, the share of documents with non-ASCII characters, the
share ftfy changes beyond NFC, both times and MB/s, and the speed-up.
"""

from __future__ import annotations

import argparse
import sys
import time
import unicodedata
from pathlib import Path

from dedup_corpus import prepare, read_zst_lines

from lmpipe.dataprep.textfix import fix_text, fix_text_reference


def corpus_texts(folder: Path) -> list[str]:
    return [r["text"] for part in sorted((folder / "raw").rglob("*.jsonl.zst")) for r in read_zst_lines(part)]  # fmt: skip


def timed(fn, texts: list[str]) -> tuple[list[str], float]:
    start = time.process_time()
    out = [fn(t) for t in texts]
    return out, time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="code,web")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lmpipe-dedup-bench"))
    args = parser.parse_args()
    fix_text("warm up é“”")  # the character tables are built once per process
    rows, failed = [], False
    for corpus in args.corpus.split(","):
        texts = corpus_texts(Path(prepare(args.workdir, args.scale, args.seed, corpus)["folder"]))
        reference, t_ftfy = timed(fix_text_reference, texts)
        ours, t_ours = timed(fix_text, texts)
        differ = [i for i, (a, b) in enumerate(zip(reference, ours, strict=True)) if a != b]
        failed |= bool(differ)
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        non_ascii = sum(not t.isascii() for t in texts)
        beyond_nfc = sum(
            r != unicodedata.normalize("NFC", t) for r, t in zip(reference, texts, strict=True)
        )
        rows.append(
            f"| {corpus} | {len(texts):,} | {mb:.1f} | {100 * non_ascii / len(texts):.0f}% | "
            f"{100 * beyond_nfc / len(texts):.0f}% | {t_ftfy:.2f} ({mb / t_ftfy:.1f} MB/s) | "
            f"{t_ours:.2f} ({mb / t_ours:.1f} MB/s) | {t_ftfy / t_ours:.1f}x | {len(differ)} |"
        )
        print(rows[-1], file=sys.stderr)
    print(
        "| corpus | documents | MB | non-ASCII docs | changed beyond NFC | ftfy core-s | "
        "lmpipe core-s | speed-up | documents that differ |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
