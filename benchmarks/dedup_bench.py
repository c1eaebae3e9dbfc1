"""Benchmark `lmpipe dedup` against the deduplicators people use, on a corpus with a known truth.

    python benchmarks/dedup_bench.py [--scale 1.0] [--seed 0] [--systems lmpipe,baseline,datatrove]
                                     [--lmpipe-args "--verify -j 2"] [--workdir /tmp/lmpipe-dedup-bench]
                                     [--files-scale 4]

Corpus (built here, offline, cached in `--workdir` per scale and seed): real text of this
installation in four sources (folders): `stdlib_code` (the standard library's .py files cut at line
breaks into documents of about 2 kB), `site_code` (the same for the installed packages: vendored
copies and shared boilerplate are natural duplicates), `docs` (pydoc help topics, standard-library
docstrings) and `package_text` (READMEs, changelogs and licence files of installed packages: many
licences are natural near duplicates). Into it go injected near duplicates with controlled edits:
word edits, typos, truncation, splicing with another document, whitespace/case/punctuation changes
(identical once normalised), combinations, and variants of variants; about a third land in another
source. Every text is passed through `ftfy.fix_text(NFC)` once when the corpus is built, so what
every system sees after its own ftfy step is the text the truth was computed on (ftfy is
idempotent on its own output). Scale 1.0 is the issue's size: about 41k documents, 78 MB.

Truth: the character 13-gram Jaccard of every pair of documents with J >= 0.7, on SlimPajama's
normalised text, found by an exact similarity join (AllPairs prefix filtering, Bayardo et al. 2007):
identical normalised texts are grouped first (J = 1 with each other); each remaining text's
shingle set is sorted by global rarity, and any pair with J >= t must share a token among the first
|A| - ceil(t|A|) + 1 tokens of both prefixes (if they shared none, the overlap would be at most
ceil(t|A|) - 1 < t|A| <= t|A u B|). Every pair sharing a prefix token that also passes the size
filter (|B| >= t|A|, implied by J >= t) is verified with an exact intersection of the two sets. So
the pair list is exact, given distinct shingles get distinct 64-bit hashes: with SipHash-1-3
(Python's `hash`) over ~70M distinct shingles the chance of any collision is ~1e-4, and a collision
could only move one Jaccard by one shingle. True clusters: connected components of pairs at J >= 0.8
(the threshold every system is asked to use).

`--files-scale K` (memory against corpus size): the same corpus at the same file size, K times as
many files. Each input file is written K times (`part-<k>-copy<c>.jsonl.zst`, copy 0 byte-identical
to the cached file, copy c's ids suffixed `#c`), so every document has K - 1 verbatim duplicates in
other files, and the truth stays exact: a copy has J = 1 with its original, so each true cluster of
the corpus takes in all its copies (a singleton becomes a cluster of K). What grows K-fold: the
bytes read, fixed, hashed and written, the exact and LSH keys, the documents in the union-find.
What does not: the near duplicates to verify (the copies leave at the exact step).

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
import ast
import io
import json
import os
import random
import re
import shlex
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

THRESHOLD, TRUTH_MIN, NGRAM = 0.8, 0.7, 13
# Documents of real text are at least this long once normalised: far above the 200 of the short
# filter, so no system drops a document as short and the truth can ignore that step.
MIN_NORM_CHARS = 300
BYTES_AT_SCALE_1 = 72_000_000  # real text; injected copies bring it to ~78 MB
INJECT_SHARE = 0.12
PUNCT = str.maketrans("", "", "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def normalise(text: str) -> str:
    """SlimPajama's clean() (the same as lmpipe's; repeated so the truth does not depend on it)."""
    return " ".join(text.lower().translate(PUNCT).split())


# --- the corpus ---------------------------------------------------------------------------------


def chunks(text: str, rng: random.Random) -> list[str]:
    """A file cut at line breaks into documents of ~2 kB. The cut points depend only on the text
    (an RNG seeded by its length), so two copies of a file give the same documents."""
    local = random.Random(len(text))
    out, cur, size = [], [], 0
    target = int(local.lognormvariate(7.4, 0.5))
    for line in text.splitlines(keepends=True):
        cur.append(line)
        size += len(line)
        if size >= target:
            out.append("".join(cur))
            cur, size, target = [], 0, int(local.lognormvariate(7.4, 0.5))
    if cur:
        out.append("".join(cur))
    return out


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def real_sources(budget: int, rng: random.Random) -> dict[str, list[str]]:
    """The real documents per source, each source up to its share of `budget` bytes."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    site = Path(sysconfig.get_paths()["purelib"])
    std_files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    site_files = sorted(site.rglob("*.py"))
    text_files = sorted(
        p
        for p in site.rglob("*")
        if p.is_file()
        and (p.suffix in (".md", ".rst", ".txt") or p.name.startswith(("LICENSE", "COPYING")))
    )
    docs: list[str] = []
    from pydoc_data.topics import topics

    docs += [topics[k] for k in sorted(topics)]
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                if doc := ast.get_docstring(node):
                    docs.append(doc)
    shares = {"stdlib_code": 0.42, "site_code": 0.46, "docs": 0.06, "package_text": 0.06}
    raw = {
        "stdlib_code": (read_text(p) for p in std_files),
        "site_code": (read_text(p) for p in site_files),
        "docs": iter(docs),
        "package_text": (read_text(p) for p in text_files),
    }
    out: dict[str, list[str]] = {}
    for source, texts in raw.items():
        cap, size, kept = shares[source] * budget, 0, []
        for text in texts:
            if text is None:
                continue
            for doc in chunks(text, rng) if source != "docs" else [text]:
                if len(normalise(doc)) >= MIN_NORM_CHARS:
                    kept.append(doc)
                    size += len(doc.encode("utf-8"))
            if size >= cap:
                break
        out[source] = kept
    return out


def _edit_words(rng: random.Random, text: str, share: float) -> str:
    words = text.split(" ")
    for _ in range(max(1, int(len(words) * share))):
        i = rng.randrange(len(words))
        op = rng.random()
        if op < 0.4:
            words[i] = rng.choice(words)
        elif op < 0.7:
            words[i] = ""
        else:
            words.insert(i, rng.choice(words))
    return " ".join(words)


def _typos(rng: random.Random, text: str, share: float) -> str:
    chars = list(text)
    for _ in range(max(1, int(len(chars) * share))):
        chars[rng.randrange(len(chars))] = rng.choice("abcdefghijklmnopqrstuvwxyz")
    return "".join(chars)


def _surface(rng: random.Random, text: str) -> str:
    out = []
    for token in re.split(r"(\s+)", text):
        r = rng.random()
        if token.isspace():
            token = rng.choice([" ", "  ", "\n", "\t"]) if r < 0.2 else token
        elif r < 0.1:
            token = token.upper() if r < 0.05 else token.capitalize()
        elif r < 0.13:
            token += rng.choice(",;.!")
        out.append(token)
    return "".join(out)


def variant(rng: random.Random, text: str, other: str) -> tuple[str, str]:
    """A controlled edit of `text`; `other` is a random document for splicing."""
    kind = rng.choice(["words", "words", "typos", "truncate", "splice", "surface", "combo"])
    if kind == "words":
        return _edit_words(rng, text, rng.uniform(0.005, 0.06)), kind
    if kind == "typos":
        return _typos(rng, text, rng.uniform(0.001, 0.015)), kind
    if kind == "truncate":
        keep = rng.uniform(0.6, 0.98)
        cut = int(len(text) * keep)
        return (text[:cut] if rng.random() < 0.7 else text[len(text) - cut :]), kind
    if kind == "splice":
        cut = int(len(text) * rng.uniform(0.7, 0.97))
        return text[:cut] + other[: max(0, len(text) - cut)], kind
    if kind == "surface":
        return _surface(rng, text), kind
    text = _edit_words(rng, text, rng.uniform(0.003, 0.02))
    return _surface(rng, _typos(rng, text, rng.uniform(0.0005, 0.004))), kind


def build_corpus(raw: Path, scale: float, seed: int) -> dict[str, Any]:
    """Write raw/<source>/part-<k>.jsonl.zst and return the documents' ids and texts in input
    order (sources sorted by name, files in order), with the injected edit counts."""
    import ftfy

    rng = random.Random(seed)
    sources = real_sources(int(BYTES_AT_SCALE_1 * scale), rng)
    everything = [(s, t) for s in sources for t in sources[s]]
    n_inject = int(INJECT_SHARE * len(everything))
    kinds: dict[str, int] = {}
    injected: list[tuple[str, str]] = []
    for _ in range(n_inject):
        src, text = rng.choice(everything)
        if injected and rng.random() < 0.15:  # a variant of a variant: chains A ~ B ~ C
            src, text = rng.choice(injected)
        new, kind = variant(rng, text, rng.choice(everything)[1])
        kinds[kind] = kinds.get(kind, 0) + 1
        to = rng.choice(list(sources)) if rng.random() < 0.35 else src
        injected.append((to, new))
    for to, new in injected:
        lst = sources[to]
        lst.insert(rng.randint(0, len(lst)), new)
    ids, texts = [], []
    for source in sorted(sources):
        docs = [ftfy.fix_text(t, normalization="NFC") for t in sources[source]]
        (raw / source).mkdir(parents=True, exist_ok=True)
        per_file = max(1, len(docs) // 4 + 1)
        for k in range(0, len(docs), per_file):
            lines = []
            for j, text in enumerate(docs[k : k + per_file]):
                ids.append(f"{source}/{k + j}")
                texts.append(text)
                lines.append(json.dumps({"text": text, "id": ids[-1], "meta": {"source": source}}))
            data = ("\n".join(lines) + "\n").encode("utf-8")
            (raw / source / f"part-{k // per_file}.jsonl.zst").write_bytes(
                zstandard.ZstdCompressor(level=3).compress(data)
            )
    return {"ids": ids, "texts": texts, "injected": kinds}


# --- the truth ----------------------------------------------------------------------------------


def shingle_set(norm: str) -> np.ndarray:
    n = len(norm) - NGRAM + 1
    if n <= 0:
        return np.array([hash(norm)], dtype=np.int64)
    grams = np.fromiter((hash(norm[i : i + NGRAM]) for i in range(n)), dtype=np.int64, count=n)
    return np.unique(grams)


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Root of each node's connected component (plain union-find: this must not share code with
    what it judges)."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(x) for x in range(n)])


def exact_pairs(texts: list[str], t: float) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i < j) of documents with character 13-gram Jaccard >= t, and its Jaccard."""
    norms = [normalise(x) for x in texts]
    # Identical normalised texts: one representative each; pairs among copies have J = 1.
    first: dict[str, int] = {}
    rep = np.array([first.setdefault(s, i) for i, s in enumerate(norms)])
    reps = np.flatnonzero(rep == np.arange(len(norms)))
    sets = [shingle_set(norms[i]) for i in reps]
    sizes = np.array([len(s) for s in sets])
    doc = np.repeat(np.arange(len(sets)), sizes)
    tok = np.concatenate(sets)
    uniq, inv, df = np.unique(tok, return_inverse=True, return_counts=True)
    order = np.lexsort((uniq, df))  # rarest first, ties by hash: one global total order
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[order] = np.arange(len(uniq))
    r = rank[inv]
    by = np.lexsort((r, doc))
    doc, r = doc[by], r[by]
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    pos = np.arange(len(doc)) - np.repeat(starts, sizes)
    # Prefix length |A| - ceil(t|A|) + 1, with t lowered by 1e-9 so float rounding only lengthens it.
    plen = sizes - np.ceil((t - 1e-9) * sizes).astype(np.int64) + 1
    keep = pos < plen[doc]
    doc, r = doc[keep], r[keep]
    by = np.lexsort((doc, r))
    doc, r = doc[by], r[by]
    # All pairs within each group of equal tokens, vectorised: entry i pairs with the entries
    # after it in its group.
    gstart = np.r_[0, np.flatnonzero(r[1:] != r[:-1]) + 1]
    gend = np.r_[gstart[1:], len(r)]
    glen = gend - gstart
    after = np.repeat(gend, glen) - np.arange(len(r)) - 1
    left = np.repeat(np.arange(len(r)), after)
    offs = np.arange(len(left)) - np.repeat(np.cumsum(after) - after, after)
    right = left + offs + 1
    a, b = doc[left], doc[right]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    code = np.unique(lo.astype(np.int64) * len(sets) + hi)
    lo, hi = code // len(sets), code % len(sets)
    small, big = np.minimum(sizes[lo], sizes[hi]), np.maximum(sizes[lo], sizes[hi])
    ok = small >= (t - 1e-9) * big
    lo, hi = lo[ok], hi[ok]
    jac = np.empty(len(lo))
    for k, (x, y) in enumerate(zip(lo.tolist(), hi.tolist(), strict=True)):
        inter = len(np.intersect1d(sets[x], sets[y], assume_unique=True))
        jac[k] = inter / (len(sets[x]) + len(sets[y]) - inter)
    hit = jac >= t
    lo, hi, jac = reps[lo[hit]], reps[hi[hit]], jac[hit]
    # Back to all documents: copies pair with each other at 1.0 and with their rep's partners.
    members: dict[int, list[int]] = {}
    for i, p in enumerate(rep.tolist()):
        members.setdefault(p, []).append(i)
    out_pairs, out_j = [], []
    for group in members.values():
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                out_pairs.append((group[i], group[j]))
                out_j.append(1.0)
    for x, y, jj in zip(lo.tolist(), hi.tolist(), jac.tolist(), strict=True):
        for i in members[x]:
            for j in members[y]:
                out_pairs.append((min(i, j), max(i, j)))
                out_j.append(jj)
    return np.array(out_pairs, dtype=np.int64).reshape(-1, 2), np.array(out_j)


def prepare(workdir: Path, scale: float, seed: int) -> dict[str, Any]:
    """The corpus and its truth, built once per (scale, seed) and cached."""
    folder = workdir / f"scale{scale:g}-seed{seed}"
    meta_path = folder / "truth.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text()) | {"folder": str(folder)}
    start = time.perf_counter()
    corpus = build_corpus(folder / "raw", scale, seed)
    built = time.perf_counter()
    pairs, jac = exact_pairs(corpus["texts"], TRUTH_MIN)
    strong = pairs[jac >= THRESHOLD]
    root = components(len(corpus["ids"]), strong)
    meta = {
        "documents": len(corpus["ids"]),
        "bytes": sum(len(t.encode("utf-8")) for t in corpus["texts"]),
        "injected": corpus["injected"],
        "pairs_0.7": int(len(pairs)),
        "pairs_0.8": int(len(strong)),
        "cluster": root.tolist(),
        "ids": corpus["ids"],
        "seconds_build": round(built - start, 1),
        "seconds_truth": round(time.perf_counter() - built, 1),
    }
    meta_path.write_text(json.dumps(meta))
    return meta | {"folder": str(folder)}


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


def read_zst_lines(path: Path) -> list[dict[str, Any]]:
    with open(path, "rb") as f:
        data = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True).read()
    return [json.loads(line) for line in io.BytesIO(data) if line.strip()]


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


def files_scaled(folder: Path, truth: dict[str, Any], k: int) -> tuple[Path, dict[str, Any]]:
    """The corpus with every file written `k` times (`--files-scale`), and its exact truth."""
    if k == 1:
        return folder / "raw", truth
    raw = folder / f"raw-files{k}"
    if not raw.exists():
        staging = folder / f"raw-files{k}.partial"
        subprocess.run(["rm", "-rf", str(staging)], check=True)
        for part in sorted((folder / "raw").rglob("*.jsonl.zst")):
            target = staging / part.parent.relative_to(folder / "raw")
            target.mkdir(parents=True, exist_ok=True)
            stem = part.name.removesuffix(".jsonl.zst")
            (target / f"{stem}-copy0.jsonl.zst").write_bytes(part.read_bytes())
            records = read_zst_lines(part)
            for c in range(1, k):
                lines = [json.dumps({**r, "id": f"{r['id']}#{c}"}) for r in records]
                data = zstandard.ZstdCompressor(level=3).compress(
                    ("\n".join(lines) + "\n").encode()
                )
                (target / f"{stem}-copy{c}.jsonl.zst").write_bytes(data)
        staging.rename(raw)
    ids = list(truth["ids"]) + [f"{i}#{c}" for c in range(1, k) for i in truth["ids"]]
    scaled = truth | {"ids": ids, "cluster": list(truth["cluster"]) * k}
    return raw, scaled | {"documents": truth["documents"] * k, "bytes": truth["bytes"] * k}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="1.0: ~41k documents, ~78 MB")
    parser.add_argument("--seed", type=int, default=0)
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
    parser.add_argument("--run-system", help=argparse.SUPPRESS)  # internal: one system, in-process
    parser.add_argument("--raw", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_system:
        {"baseline": run_baseline, "datatrove": run_datatrove}[args.run_system](args.raw, args.out)
        return

    truth = prepare(args.workdir, args.scale, args.seed)
    folder = Path(truth["folder"])
    raw, truth = files_scaled(folder, truth, args.files_scale)
    size = np.bincount(truth["cluster"])
    print(
        f"corpus {folder}: {truth['documents']:,} documents, {truth['bytes'] / 1e6:.1f} MB, "
        f"injected {sum(truth['injected'].values()):,} {truth['injected']}; "
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
