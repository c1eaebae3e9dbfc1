"""Peak memory of `lmpipe dedup` on one huge document (a single multi-MB jsonl line).

    python benchmarks/huge_document.py [--chars 43000000]

Builds three one-file corpora from Python sources (the standard library's, then the installed
packages'; ASCII files only): one small document (the process's own footprint), one document of
`--chars` characters, and the same document with a character beyond U+FFFF at its start (Python
then holds the text at 4 bytes a character). Each runs `lmpipe dedup IN -o OUT` as a child
process; its peak resident memory comes from wait4. The huge documents must come out kept and
whole (the output's text equals the input's), so a path that drops or cuts them cannot look
cheap.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import zstandard


def ascii_sources(chars: int) -> str:
    """`chars` characters of the ASCII .py files of the standard library and then the installed
    packages (repeated if they hold fewer)."""
    parts, total = [], 0
    roots = dict.fromkeys(Path(sysconfig.get_paths()[key]) for key in ("stdlib", "purelib"))
    paths = (path for root in roots for path in sorted(root.rglob("*.py")))
    for path in paths:
        try:
            text = path.read_text(encoding="ascii")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        total += len(text)
        if total >= chars:
            break
    if not total:
        raise SystemExit("no ASCII Python sources found")
    text = "".join(parts)
    return (text * -(-chars // len(text)))[:chars]


def peak_rss_mb(cmd: list[str]) -> float:
    """Run `cmd`; its peak resident set in MB (wait4's ru_maxrss, KiB on Linux)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {stderr.decode(errors='replace')[-500:]}")
    return usage.ru_maxrss / 1024


def kept_text(out: Path) -> list[str]:
    """Every document the output holds (training and held-out parts)."""
    texts = []
    for part in sorted(out.rglob("*.jsonl.zst")):
        with zstandard.open(part, "rt", encoding="utf-8") as f:
            texts.extend(json.loads(line)["text"] for line in f)
    return texts


def write_inputs(folder: Path, chars: int) -> None:
    """in0/, in1/, in2/: the three one-document corpora."""
    big = ascii_sources(chars)
    for i, text in enumerate((ascii_sources(20_000), big, "\U0001f600" + big[1:])):
        (folder / f"in{i}").mkdir()
        with open(folder / f"in{i}" / "doc.jsonl", "w", encoding="utf-8") as f:
            f.write(json.dumps({"text": text}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=43_000_000)
    parser.add_argument("--write-inputs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_inputs:
        write_inputs(args.write_inputs, args.chars)
        return
    labels = [
        "one small document",
        f"one {args.chars / 1e6:.0f}M-character ASCII document",
        "the same with one character beyond U+FFFF",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        # A child writes the inputs: a forked child's peak RSS counts the parent's pages until it
        # execs, so this process must stay small while it starts the measured runs.
        writer = [sys.executable, __file__, "--chars", str(args.chars), "--write-inputs", tmp]
        subprocess.run(writer, check=True)
        peaks = []
        for i in range(len(labels)):
            src, out = Path(tmp) / f"in{i}", Path(tmp) / f"out{i}"
            peaks.append(
                peak_rss_mb([sys.executable, "-m", "lmpipe.cli", "dedup", str(src), "-o", str(out)])
            )
        for i, (label, rss) in enumerate(zip(labels, peaks, strict=True)):
            with open(Path(tmp) / f"in{i}" / "doc.jsonl", encoding="utf-8") as f:
                text = json.loads(f.read())["text"]
            if kept_text(Path(tmp) / f"out{i}") != [text]:
                raise SystemExit(f"{label}: the document did not come out whole")
            print(f"{label}: peak RSS {rss:,.0f} MB")


if __name__ == "__main__":
    main()
