"""The corpus with a known truth that `dedup_bench.py` scores every deduplicator against.

Corpus (built offline, cached in `--workdir` per scale and seed): real text of this installation in
four sources (folders): `stdlib_code` (the standard library's .py files cut at line breaks into
documents of about 2 kB), `site_code` (the same for the installed packages: vendored copies and
shared boilerplate are natural duplicates), `docs` (pydoc help topics, standard-library docstrings)
and `package_text` (READMEs, changelogs and licence files of installed packages: many licences are
natural near duplicates). Into it go injected near duplicates with controlled edits: word edits,
typos, truncation, splicing with another document, whitespace/case/punctuation changes (identical
once normalised), combinations, and variants of variants; about a third land in another source.
Every text is passed through `ftfy.fix_text(NFC)` once when the corpus is built, so what every
system sees after its own ftfy step is the text the truth was computed on (ftfy is idempotent on
its own output). Scale 1.0 is the issue's size: about 41k documents, 78 MB. Because the text is the
installation's, a scale and seed give the same bytes only under the same Python and the same
installed packages (`site_code` and `package_text` read the running interpreter's site-packages).

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

`--corpus web` (ftfy's share of the work): web-like text where about half the documents carry
non-ASCII characters. Half of the bytes are manual pages of this installation rendered as UTF-8 by
groff (`-k -Tutf8`: English, whose renderings hold typographic quotes and hyphens, and the
translated pages: German, French, Russian, Japanese, Chinese, ...), half the `code` corpus's
sources; then damage of the kinds ftfy repairs, one kind per damaged document (a quarter of them):
mojibake (UTF-8 read as Windows-1252, Latin-1, MacRoman, Windows-1251, sometimes twice), HTML
entities, Latin ligatures, fullwidth forms, control characters, terminal escapes, CRLF / CR / U+2028
line breaks. The files hold the damaged text; the truth is computed on `ftfy.fix_text(NFC)` of it,
the text every system sees after its own ftfy step.

`--files-scale K` (memory against corpus size): the same corpus at the same file size, K times as
many files. Each input file is written K times (`part-<k>-copy<c>.jsonl.zst`, copy 0 byte-identical
to the cached file, copy c's ids suffixed `#c`), so every document has K - 1 verbatim duplicates in
other files, and the truth stays exact: a copy has J = 1 with its original, so each true cluster of
the corpus takes in all its copies (a singleton becomes a cluster of K). What grows K-fold: the
bytes read, fixed, hashed and written, the exact and LSH keys, the documents in the union-find.
What does not: the near duplicates to verify (the copies leave at the exact step).
"""

from __future__ import annotations

import ast
import gzip
import io
import json
import os
import random
import re
import subprocess
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

THRESHOLD, TRUTH_MIN, NGRAM = 0.8, 0.7, 13
# Documents of real text are at least this long once normalised: far above the 200 of the short
# filter, so no system drops a document as short and the truth can ignore that step.
MIN_NORM_CHARS = 300
BYTES_AT_SCALE_1 = 72_000_000  # real text; injected copies bring it to ~78 MB
WEB_BYTES_AT_SCALE_1 = 36_000_000  # `--corpus web`: ~40 MB with the injected copies
DAMAGE_SHARE = 0.25
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


def rendered_manpages(budget: int, rng: random.Random) -> list[str]:
    """Manual pages rendered as UTF-8 text (every language installed), cut into ~2 kB documents,
    in a seeded order, up to `budget` bytes."""
    root = Path("/usr/share/man")
    pages = sorted(p for p in root.rglob("*.gz") if p.is_file())
    local = random.Random(rng.random())
    local.shuffle(pages)
    # Translations first: they are few, and the share of non-English text should not depend on
    # how many English pages fit the budget.
    pages.sort(key=lambda p: p.relative_to(root).parts[0].startswith("man"))

    def render(page: Path) -> tuple[str, str]:
        """(text, error): the error is groff's first line when the page failed."""
        try:
            source = gzip.decompress(page.read_bytes())
            result = subprocess.run(
                ["groff", "-k", "-Tutf8", "-man", "-P", "-cbou"],
                input=source,
                capture_output=True,
                env={**os.environ, "LC_ALL": "C.UTF-8"},
            )
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            return "", f"{page}: {e}"
        if result.returncode != 0:
            lines = result.stderr.decode("utf-8", errors="replace").strip().splitlines()
            return "", f"{page}: {lines[0] if lines else f'exit status {result.returncode}'}"
        return result.stdout.decode("utf-8", errors="replace"), ""

    out: list[str] = []
    size, failed, first_error = 0, 0, ""
    with ThreadPoolExecutor(4) as pool:
        for start in range(0, len(pages), 64):
            for text, error in pool.map(render, pages[start : start + 64]):
                failed += bool(error)
                first_error = first_error or error
                for doc in chunks(text, rng):
                    if len(normalise(doc)) >= MIN_NORM_CHARS:
                        out.append(doc)
                        size += len(doc.encode("utf-8"))
            if size >= budget:
                break
    # Without groff or the pages the corpus would quietly lose its non-English half.
    if size < budget // 2:
        raise SystemExit(
            f"manual pages gave {size:,} of the {budget:,} bytes the web corpus needs "
            f"({len(pages):,} pages under {root}, {failed} failed to render"
            f"{': ' + first_error if first_error else ''}); install groff and the manual pages"
        )
    return out


MOJIBAKE_CODECS = ["cp1252", "cp1252", "latin-1", "mac_roman", "cp1251"]
ENTITIES = {"&": "&amp;", '"': "&quot;", "'": "&#39;", "é": "&eacute;", "ü": "&uuml;", "—": "&mdash;"}  # fmt: skip
LIGATURES = {"fi": "\ufb01", "fl": "\ufb02", "ff": "\ufb00", "ij": "\u0133"}


def damage(rng: random.Random, text: str) -> tuple[str, str]:
    """One kind of damage that ftfy repairs."""
    kind = rng.choice(["mojibake", "mojibake", "entities", "ligatures", "fullwidth", "controls", "escapes", "breaks"])  # fmt: skip
    if kind == "mojibake":
        for _ in range(2 if rng.random() < 0.15 else 1):
            text = text.encode("utf-8").decode(rng.choice(MOJIBAKE_CODECS), errors="replace")
    elif kind == "entities":
        text = re.sub("[&\"'éü—]", lambda m: ENTITIES[m.group()] if rng.random() < 0.5 else m.group(), text)  # fmt: skip
    elif kind == "ligatures":
        text = re.sub("fi|fl|ff|ij", lambda m: LIGATURES[m.group()], text)
    elif kind == "fullwidth":
        words = text.split(" ")
        for i in rng.sample(range(len(words)), k=max(1, len(words) // 20)):
            words[i] = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in words[i])
        text = " ".join(words)
    elif kind == "controls":
        chars = list(text)
        for _ in range(max(1, len(chars) // 300)):
            chars.insert(rng.randrange(len(chars)), rng.choice("\x00\x01\x07\x0b\x7f\ufeff"))
        text = "".join(chars)
    elif kind == "escapes":
        text = re.sub(r"\b([A-Z][A-Z]+)\b", "\x1b[1m\\1\x1b[0m", text)
    else:
        text = text.replace("\n", rng.choice(["\r\n", "\r", "\u2028"]))
    return text, kind


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
    if not chars:  # a variant of a variant can be empty
        return text
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


def build_corpus(raw: Path, scale: float, seed: int, corpus: str = "code") -> dict[str, Any]:
    """Write raw/<source>/part-<k>.jsonl.zst and return the documents' ids and (fixed) texts in
    input order (sources sorted by name, files in order), with the injected edit counts."""
    import ftfy

    rng = random.Random(seed)
    if corpus == "web":
        budget = int(WEB_BYTES_AT_SCALE_1 * scale)
        sources = real_sources(budget // 2, rng)
        sources["manpages"] = rendered_manpages(budget // 2, rng)
    else:
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
    damaged: dict[str, int] = {}
    if corpus == "web":  # damage after the near duplicates: a copy and its original differ in it
        for source in sources:
            for i, text in enumerate(sources[source]):
                if rng.random() < DAMAGE_SHARE:
                    sources[source][i], kind = damage(rng, text)
                    damaged[kind] = damaged.get(kind, 0) + 1
    ids, texts = [], []
    for source in sorted(sources):
        fixed = [ftfy.fix_text(t, normalization="NFC") for t in sources[source]]
        # The code corpus is written fixed (its own text is what it is about); the web corpus
        # as damaged, for every system's ftfy step to repair.
        docs = sources[source] if corpus == "web" else fixed
        (raw / source).mkdir(parents=True, exist_ok=True)
        per_file = max(1, len(docs) // 4 + 1)
        for k in range(0, len(docs), per_file):
            lines = []
            for j, text in enumerate(docs[k : k + per_file]):
                ids.append(f"{source}/{k + j}")
                texts.append(fixed[k + j])
                lines.append(json.dumps({"text": text, "id": ids[-1], "meta": {"source": source}}))
            data = ("\n".join(lines) + "\n").encode("utf-8")
            (raw / source / f"part-{k // per_file}.jsonl.zst").write_bytes(
                zstandard.ZstdCompressor(level=3).compress(data)
            )
    return {"ids": ids, "texts": texts, "injected": kinds, "damaged": damaged}


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


def prepare(workdir: Path, scale: float, seed: int, corpus: str = "code") -> dict[str, Any]:
    """The corpus and its truth, built once per (corpus, scale, seed) and cached."""
    name = f"scale{scale:g}-seed{seed}"
    folder = workdir / (name if corpus == "code" else f"{corpus}-{name}")
    meta_path = folder / "truth.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text()) | {"folder": str(folder)}
    start = time.perf_counter()
    corpus = build_corpus(folder / "raw", scale, seed, corpus)
    built = time.perf_counter()
    pairs, jac = exact_pairs(corpus["texts"], TRUTH_MIN)
    strong = pairs[jac >= THRESHOLD]
    root = components(len(corpus["ids"]), strong)
    meta = {
        "documents": len(corpus["ids"]),
        "bytes": sum(len(t.encode("utf-8")) for t in corpus["texts"]),
        "injected": corpus["injected"],
        "damaged": corpus["damaged"],
        "pairs_0.7": int(len(pairs)),
        "pairs_0.8": int(len(strong)),
        "cluster": root.tolist(),
        "ids": corpus["ids"],
        "seconds_build": round(built - start, 1),
        "seconds_truth": round(time.perf_counter() - built, 1),
    }
    meta_path.write_text(json.dumps(meta))
    return meta | {"folder": str(folder)}


# --- reading it back, and `--files-scale` -------------------------------------------------------


def read_zst_lines(path: Path) -> list[dict[str, Any]]:
    with open(path, "rb") as f:
        data = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True).read()
    return [json.loads(line) for line in io.BytesIO(data) if line.strip()]


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
