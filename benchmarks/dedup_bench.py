"""Benchmark `lmpipe dedup` against the deduplicators people use, on a corpus with a known truth.

    python benchmarks/dedup_bench.py [--scale 1.0] [--seed 0] [--systems lmpipe,baseline,datatrove]
                                     [--lmpipe-args "--verify -j 2"] [--workdir /tmp/lmpipe-dedup-bench]
                                     [--files-scale 4]

The corpus and its truth are built by `dedup_corpus.py` beside this file (offline, cached in
`--workdir` per scale and seed; its docstring says what is in it and how the truth is computed).
`--files-scale K` (memory against corpus size) runs on the same corpus with every file written K
times (`dedup_corpus.files_scaled`).

Metrics, as issue 3 defines them: removal precision, the share of removed documents whose true
cluster still has a kept member; removal recall, the share of the removals the truth asks for (all
but one per true cluster) that were made (per cluster, min(removed, size - 1)). Core-seconds are the
user+sys CPU of the system's whole process tree (os.wait4 of a subprocess, which includes every
descendant it waited for), end to end: read, fix, hash, cluster, write the kept documents. Peak RSS
is the largest sum of RSS over the process tree, sampled every 20 ms, or the largest single
process's own high-water mark (VmHWM) if that is larger.

Systems: `lmpipe` (`python -m lmpipe.cli dedup`, plus `--lmpipe-args`); `baseline`, what a user
writes in an afternoon: ftfy + SlimPajama's normalisation + `datasketch.MinHash.update_batch` +
`MinHashLSH(threshold=0.8, num_perm=128)` + union-find, one process; `datatrove`, its four MinHash
steps (signatures, buckets, clusters, filter) run by its LocalPipelineExecutor with one task, its
ftfy formatter first, 9 buckets x 13 hashes, and shingles replaced by character 13-grams of the same
normalised text (its default is word 5-grams of its own normalisation); skipped if not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

# `dedup_corpus.py` sits beside this script, not in a package: running the script puts its folder
# first on sys.path, and so does the `--run-system` child it re-launches (same `__file__`).
from dedup_corpus import NGRAM, THRESHOLD, files_scaled, normalise, prepare, read_zst_lines

# --- the systems ----------------------------------------------------------------------------------


def run_measured(cmd: list[str]) -> dict[str, Any]:
    """Run `cmd`; its process tree's user+sys seconds, wall seconds and peak RSS."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = [0]
    hwm: dict[int, int] = {}  # per process: its own high-water mark (VmHWM resets at exec)
    done = threading.Event()

    def sample() -> None:
        try:
            top = psutil.Process(proc.pid)
            while not done.is_set():
                total = 0
                for p in [top, *top.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                        status = Path(f"/proc/{p.pid}/status").read_text()
                        kb = int(status.split("VmHWM:")[1].split()[0])
                        hwm[p.pid] = max(hwm.get(p.pid, 0), kb * 1024)
                    except (psutil.Error, OSError, IndexError):
                        pass
                peak[0] = max(peak[0], total)
                time.sleep(0.02)
        except psutil.Error:
            pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{stderr.decode()[-3000:]}")
    return {
        "core_s": usage.ru_utime + usage.ru_stime,
        "wall_s": time.perf_counter() - start,
        # Not ru_maxrss: Linux carries it across exec, so it would include this process's peak.
        "rss_mb": max(peak[0], max(hwm.values(), default=0)) / 1e6,
    }


def removed_lmpipe(out: Path) -> set[str]:
    return {
        r["id"]
        for r in read_zst_lines(out / "removed.ndjson.zst")
        if r["reason"] in ("exact duplicate", "near duplicate")
    }


def run_baseline(raw: Path, out: Path) -> None:
    """The deduplicator a user writes: ftfy, SlimPajama's normalisation, datasketch, union-find."""
    import ftfy
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=128)
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    records = []
    for path in sorted(raw.rglob("*.jsonl.zst")):
        for record in read_zst_lines(path):
            record["text"] = ftfy.fix_text(record["text"], normalization="NFC")
            norm = normalise(record["text"])
            i = len(records)
            records.append(record)
            if len(norm) < 200:
                parent[i] = -1
                continue
            grams = {norm[k : k + NGRAM] for k in range(max(1, len(norm) - NGRAM + 1))}
            m = MinHash(num_perm=128)
            m.update_batch([g.encode("utf-8") for g in grams])
            for j in lsh.query(m):
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
            lsh.insert(i, m)
    out.mkdir(parents=True, exist_ok=True)
    removed = []
    with open(out / "kept.jsonl.zst", "wb") as f, zstandard.ZstdCompressor().stream_writer(f) as w:
        for i, record in enumerate(records):
            if parent.get(i) == -1 or find(i) != i:
                removed.append(record["id"])
            else:
                w.write((json.dumps(record) + "\n").encode("utf-8"))
    (out / "removed.json").write_text(json.dumps(removed))


def run_datatrove(raw: Path, out: Path) -> None:
    """datatrove's MinHash pipeline, 9 x 13, character 13-grams of SlimPajama's normalised text."""
    import datatrove.pipeline.dedup.minhash as dt_minhash
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.formatters import FTFYFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    class CharSignature(MinhashDedupSignature):
        def get_shingles(self, text: str) -> np.ndarray:
            norm = normalise(text)
            grams = {norm[k : k + NGRAM] for k in range(max(1, len(norm) - NGRAM + 1))}
            h = self._hash_func
            return np.fromiter((h(g.encode("utf-8")) for g in grams), dtype=np.uint64).reshape(
                (-1, 1)
            )

    # Character shingles need no word tokenizer (its English one would pull in spaCy).
    dt_minhash.load_word_tokenizer = lambda language: None
    config = MinhashConfig(n_grams=NGRAM, num_buckets=9, hashes_per_bucket=13)

    def reader() -> JsonlReader:
        return JsonlReader(str(raw), glob_pattern="*/*.jsonl.zst", compression="zstd")

    def run(steps: list[Any], tasks: int = 1) -> None:
        LocalPipelineExecutor(
            pipeline=steps, tasks=tasks, workers=1, logging_dir=str(out / f"logs{time.time_ns()}")
        ).run()

    ftfy_step = FTFYFormatter()
    run([reader(), ftfy_step, CharSignature(output_folder=str(out / "sigs"), config=config)])
    run(
        [MinhashDedupBuckets(str(out / "sigs"), str(out / "buckets"), config=config)],
        tasks=config.num_buckets,
    )
    run([MinhashDedupCluster(str(out / "buckets"), str(out / "remove"), config=config)])
    run(
        [
            reader(),
            FTFYFormatter(),
            MinhashDedupFilter(
                str(out / "remove"), exclusion_writer=JsonlWriter(str(out / "removed"))
            ),
            JsonlWriter(str(out / "kept")),
        ]
    )


def removed_datatrove(out: Path) -> set[str]:
    return {r["id"] for p in (out / "removed").glob("*.jsonl.gz") for r in _gz_lines(p)}


def _gz_lines(path: Path) -> list[dict[str, Any]]:
    import gzip

    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def score(removed: set[str], truth: dict[str, Any]) -> dict[str, float]:
    """Removal precision and recall against the true clusters (issue 3's definitions)."""
    index = {d: i for i, d in enumerate(truth["ids"])}
    cluster = np.array(truth["cluster"])
    gone = np.zeros(len(cluster), dtype=bool)
    gone[[index[d] for d in removed]] = True
    size = np.bincount(cluster, minlength=len(cluster))
    kept_in = np.bincount(cluster[~gone], minlength=len(cluster))
    gone_in = np.bincount(cluster[gone], minlength=len(cluster))
    good = int((kept_in[cluster[gone]] > 0).sum())
    made = int(np.minimum(gone_in, np.maximum(size - 1, 0)).sum())
    wanted = int(np.maximum(size - 1, 0).sum())
    return {
        "removed": int(gone.sum()),
        "precision": good / max(1, int(gone.sum())),
        "recall": made / max(1, wanted),
        "clusters_wiped": int(((size > 0) & (kept_in == 0)).sum()),
    }


STEPS = {
    "scan_file": "scan: read, fix text, normalise, MinHash",
    "fix_text": "  of which: fix text (lmpipe's ftfy)",
    "normalise": "  of which: normalise",
    "exact_partition": "exact duplicates",
    "lsh_partition": "LSH buckets",
    "merge_bucket": "candidate pairs",
    "shingle_sets_file": "shingle sets",
    "verify_chunk": "verify pairs",
    "decide_all": "components",
    "filter_file": "write kept documents",
}


def print_step_seconds(raw: Path, out: Path) -> None:
    """lmpipe's default, one process, under cProfile: the cumulative seconds of each step."""
    import cProfile
    import pstats

    from lmpipe.dataprep.dedup import dedup

    subprocess.run(["rm", "-rf", str(out), str(out) + ".partial"], check=True)
    profile = cProfile.Profile()
    profile.runcall(dedup, [raw], out, progress=False)
    stats = pstats.Stats(profile).stats  # (file, line, name) -> (calls, ..., cumulative, ...)
    total = sum(v[2] for v in stats.values())  # own time of every function: the whole run
    print("\n| step (lmpipe default, one process, under cProfile) | CPU s | share |")
    print("|---|---|---|")
    for name, label in STEPS.items():
        cum = sum(v[3] for k, v in stats.items() if k[2] == name and "lmpipe" in k[0])
        print(f"| {label} | {cum:.1f} | {100 * cum / total:.0f}% |")
    print(f"| all | {total:.1f} | 100% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="1.0: ~41k documents, ~78 MB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--corpus",
        choices=["code", "web"],
        default="code",
        help="code: source code and docs, mostly ASCII; web: half non-ASCII, damaged (ftfy's work)",
    )
    parser.add_argument("--systems", default="lmpipe,baseline,datatrove")
    parser.add_argument(
        "--lmpipe-args",
        action="append",
        default=None,
        help="extra `lmpipe dedup` options; repeat to run several lmpipe configurations",
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lmpipe-dedup-bench"))
    parser.add_argument(
        "--files-scale",
        type=int,
        default=1,
        help="K times as many files of the same size: every file of the corpus K times",
    )
    parser.add_argument(
        "--steps",
        action="store_true",
        help="also run lmpipe's default once in this process under cProfile and print the CPU "
        "seconds of each step (scan = fix + normalise + MinHash, exact, LSH, pairs, sets, verify, "
        "decide, filter)",
    )
    parser.add_argument("--run-system", help=argparse.SUPPRESS)  # internal: one system, in-process
    parser.add_argument("--raw", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_system:
        {"baseline": run_baseline, "datatrove": run_datatrove}[args.run_system](args.raw, args.out)
        return

    truth = prepare(args.workdir, args.scale, args.seed, args.corpus)
    folder = Path(truth["folder"])
    raw, truth = files_scaled(folder, truth, args.files_scale)
    size = np.bincount(truth["cluster"])
    print(
        f"corpus {folder}: {truth['documents']:,} documents, {truth['bytes'] / 1e6:.1f} MB, "
        f"injected {sum(truth['injected'].values()):,} {truth['injected']}, "
        f"damaged {truth.get('damaged', {})}; "
        f"true pairs J>=0.7: {truth['pairs_0.7']:,}, J>=0.8: {truth['pairs_0.8']:,}; "
        f"true clusters of 2+: {int((size > 1).sum()):,}, removals wanted: "
        f"{int(np.maximum(size - 1, 0).sum()):,} (built in {truth['seconds_build']} s, "
        f"truth in {truth['seconds_truth']} s)",
        file=sys.stderr,
    )
    rows = []
    for system in args.systems.split(","):
        configs = (args.lmpipe_args or [""]) if system == "lmpipe" else [""]
        for extra in configs:
            out = folder / f"out-{system}" if args.files_scale == 1 else folder / f"out-{system}-files{args.files_scale}"  # fmt: skip
            subprocess.run(["rm", "-rf", str(out), str(out) + ".partial"], check=True)
            if system == "lmpipe":
                cmd = [sys.executable, "-m", "lmpipe.cli", "dedup", str(raw), "-o", str(out)]
                cmd += shlex.split(extra)
            else:
                if system == "datatrove":
                    try:
                        import datatrove  # noqa: F401
                    except ImportError:
                        print("datatrove is not installed: skipped", file=sys.stderr)
                        continue
                cmd = [sys.executable, __file__, "--run-system", system, "--raw", str(raw)]
                cmd += ["--out", str(out)]
            usage = run_measured(cmd)
            if system == "lmpipe":
                removed = removed_lmpipe(out)
            elif system == "baseline":
                removed = set(json.loads((out / "removed.json").read_text()))
            else:
                removed = removed_datatrove(out)
            name = f"lmpipe {extra}".strip() if system == "lmpipe" else system
            rows.append({"system": name, **usage, **score(removed, truth)})
            print(f"{name}: {rows[-1]}", file=sys.stderr)
    if args.steps:
        print_step_seconds(raw, folder / "out-steps")
    print(
        f"\n{truth['documents']:,} documents, {truth['bytes'] / 1e6:.1f} MB (scale {args.scale}, "
        f"files scale {args.files_scale})\n"
    )
    print(
        "| system | core-s | wall s | peak RSS MB | removed | precision | recall | true clusters wiped |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['system']} | {r['core_s']:.1f} | {r['wall_s']:.1f} | {r['rss_mb']:.0f} | "
            f"{r['removed']:,} | {r['precision']:.4f} | {r['recall']:.4f} | {r['clusters_wiped']:,} |"
        )


if __name__ == "__main__":
    main()
