"""dedup: SlimPajama's cleaning and MinHash-LSH deduplication (seeds-spec section 5).

`dedup(inputs, out, settings)` reads `.jsonl` / `.jsonl.zst` / `.jsonl.gz` / `.parquet` documents
and, with the settings of `dedup_settings.DedupSettings` (one frozen object, passed whole to every
step), across all sources at once: fixes each text as ftfy.fix_text does (NFC; `textfix.py`, which
gives ftfy's exact output faster; `fix=False` skips it) -> drops it when its normalised form
(lowercase, no ASCII punctuation, whitespace runs collapsed) is shorter than `min_chars` (0: no
short filter) -> drops exact duplicates of the normalised text (`exact=False` skips the step: the
copies then meet in every LSH band and go as near duplicates) -> drops near duplicates
(`near=False` skips the step, and with it all MinHash work): MinHash
over character n-grams (`minhash.py`: datasketch-identical sha1 signatures, or the faster
one-permutation scheme), LSH banding tuned for the Jaccard threshold (or a lower `lsh_threshold`),
optionally `verify` (the exact n-gram Jaccard of each candidate pair, edges below the threshold
dropped), connected components of the remaining pairs; per group the first document in input
order is kept (or the longest). Then, over the kept documents, SlimPajama's holdout and SHA-256
decontamination (`holdout.py`), and with `decontaminate_ngrams` N the removal of documents that
share N consecutive words with an eval text (`decontaminate.py`). Kept records are unchanged
but for the fixed `text`. `out` gets `part-<k>.jsonl.zst` (the training documents of the k-th
input file, in order; none for a file that keeps nothing),
`_holdout/part-<k>.jsonl.zst` (its held-out documents), `removed.ndjson.zst` (every removed
document, why, and the kept document it duplicates), `clusters.png` (the duplicate cluster
sizes, when matplotlib is importable: `cluster_plot.py`) and `manifest.json` with document and
byte counts (`counts.total`, and `counts.sources` by name) and `cluster_sizes` (size ->
clusters), written last. Per source (its folder, or `source_field`) and in total:
input = kept + short + exact_duplicate + near_duplicate + decontaminated + held_out + invalid.
Blank lines are no documents: each input's `blank_lines` counts them.

The work is the map-reduce of `dedup_steps.py` and `dedup_kept.py` in `<out>.partial/`, which a
failed or killed run leaves behind: a rerun with the same inputs and settings redoes only the
units that had not finished (other settings start afresh). Memory does not grow with the
corpus's text: a unit holds one file, one partition of keys, one bucket of pairs or one
document's shingle set, and the union-find (and verify's tables) a few int64 per document that
has a candidate pair. The shingle sets are temp disk, 8 bytes a character of those documents.
The output is byte-identical for any `workers`, either engine, and after a resume. Off a
terminal (nohup, sbatch) each step says on stderr when it ends (`StepBar`).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lmpipe.dataprep.cluster_plot as cluster_plot
import lmpipe.dataprep.dedup_kept as kept_steps
import lmpipe.dataprep.dedup_steps as steps
from lmpipe.dataprep.cluster_plot import NO_PLOT, PNG, write_cluster_png
from lmpipe.dataprep.decontaminate import EVAL_NGRAMS, NGRAMS
from lmpipe.dataprep.dedup_settings import DedupSettings
from lmpipe.dataprep.dedup_steps import BUCKETS
from lmpipe.dataprep.documents import find_inputs, print_invalid
from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import (
    clear_folder,
    lmpipe_version,
    sha256_file,
    staged_output,
    write_json_atomic,
    write_manifest,
)
from lmpipe.dataprep.report import print_table
from lmpipe.dataprep.runner import Runner, TaskLost

# Where no bar is shown (stderr not a terminal), a step that is still running says how far it has
# come at most this often (seconds): a line a minute, not one a unit.
PLAIN_EVERY = 60.0

# Not `.jsonl.zst`: the output folder is the next stage's input, and `find_inputs` takes every
# `.jsonl.zst` in it as documents; the listing's records have no `text`.
REMOVED = "removed.ndjson.zst"


def source_of(path: Path, inputs: Sequence[Path]) -> str:
    """The folder a file sits in; for a folder input, the first folder below it if nested."""
    for given in inputs:
        if given.is_dir():
            try:
                rel = path.relative_to(given)
            except ValueError:
                continue
            return rel.parts[0] if len(rel.parts) > 1 else given.resolve().name
    # The folder of the name as given, not of what a link points to: a Hugging Face snapshot's
    # files are links into `blobs/`, which would name every such source `blobs`.
    return Path(os.path.abspath(path)).parent.name


def _empty_counts() -> dict[str, dict[str, int]]:
    return {b: {"documents": 0, "bytes": 0} for b in ("input", *BUCKETS)}


def check_counts(c: dict[str, dict[str, int]], source: str) -> None:
    """Every input document is in exactly one bucket; anything else is a bug in this module."""
    for unit in ("documents", "bytes"):
        total = sum(c[b][unit] for b in BUCKETS)
        if total != c["input"][unit]:
            raise AssertionError(
                f"dedup counts of {source}: {unit} {total} != input {c['input'][unit]}"
            )


def print_summary(counts: dict[str, Any], console: Any) -> None:
    """SlimPajama's per-source table: documents per bucket and the share of bytes removed; the
    total in its own section below the sources."""
    from rich import box
    from rich.table import Table

    # Two-line headings and a light box keep the table inside 80 columns.
    table = Table(
        title="lmpipe dedup: documents per source", box=box.SIMPLE_HEAD, collapse_padding=True
    )
    table.add_column("source", no_wrap=True)
    heads = ("input", "kept", "short", "exact\ndup", "near\ndup", "decon-\ntam.", "held\nout")
    for head in (*heads, "invalid", "bytes\nremoved"):
        table.add_column(head, justify="right", no_wrap=True)
    rows = [*counts["sources"].items(), ("all sources", counts["total"])]
    for i, (name, c) in enumerate(rows):
        removed = c["input"]["bytes"] - c["kept"]["bytes"] - c["held_out"]["bytes"]
        share = 100.0 * removed / c["input"]["bytes"] if c["input"]["bytes"] else 0.0
        cells = [f"{c[b]['documents']:,}" for b in ("input", *BUCKETS)]
        last = i == len(rows) - 1
        table.add_row(
            name,
            *cells,
            f"{share:.2f}%",
            style="bold" if last else None,
            end_section=i == len(rows) - 2,
        )
    print_table(console, table)


class StepBar:
    """The steps' progress on stderr: on a terminal, rich's bar, one per step, counted in units.
    Elsewhere (nohup, sbatch, a pipe) rich shows nothing, so a plain line says when each step
    ends and, at most every PLAIN_EVERY seconds, how far a long one has come."""

    def __init__(self, shown: bool) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        err = Console(stderr=True)
        self.plain = shown and not err.is_terminal
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=err, transient=True, disable=self.plain or not shown,
        )  # fmt: skip

    def __enter__(self) -> StepBar:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def run(
        self,
        runner: Runner,
        label: str,
        fn: Callable[..., dict[str, Any]],
        todo: list[tuple[Any, ...]],
        total: int,
    ) -> None:
        """Run the `todo` jobs of a step of `total` (the others finished before a resume)."""
        task = self.bar.add_task(label, total=total, completed=total - len(todo))
        start = last = time.monotonic()
        done = total - len(todo)

        def tick(index: int, result: dict[str, Any]) -> None:
            nonlocal done, last
            self.bar.advance(task)
            done += 1
            now = time.monotonic()
            if self.plain and done < total and now - last >= PLAIN_EVERY:
                self.say(f"{label}: {done} of {total} units done, {now - start:,.0f} s")
                last = now

        names = [f"dedup: {label} (unit {i + 1} of {len(todo)} to do)" for i in range(len(todo))]
        runner.map(fn, todo, tick, names=names)
        self.bar.remove_task(task)
        if self.plain and total:
            took = f"{time.monotonic() - start:,.0f} s" if todo else "before this run"
            self.say(f"{label} done: {total} unit(s), {took}")

    def say(self, line: str) -> None:
        print(f"dedup: {line}", file=sys.stderr, flush=True)


def _run_step(
    runner: Runner,
    bar: StepBar,
    label: str,
    fn: Callable[..., dict[str, Any]],
    jobs: list[tuple[Any, ...]],
    markers: list[Path],
) -> list[dict[str, Any]]:
    """Run the jobs whose marker is missing; every job's marker info, in job order."""
    todo = [job for job, m in zip(jobs, markers, strict=True) if not m.is_file()]
    bar.run(runner, label, fn, todo, len(jobs))
    return [steps.read_marker(m) for m in markers]


def _prepare_state(work: Path, fingerprint: dict[str, Any]) -> Path:
    """The steps' folder, reused when it was made for these inputs and settings, else emptied
    (with everything else in the work folder: a finished step's files from other settings must
    never mix into this run's)."""
    state = work / steps.STATE
    stamp = state / "fingerprint.json"
    try:
        if stamp.is_file() and steps.read_marker(stamp) == fingerprint:
            return state
    except ValueError:  # unreadable (not JSON, not UTF-8): not this run's, so start afresh
        pass
    clear_folder(work)  # the marks that lmpipe made this folder, and holds it, stay
    subs = (
        "scan",
        "exact",
        "lsh",
        "pairs",
        "sets",
        "verify",
        "decide",
        "evals",
        EVAL_NGRAMS,
        NGRAMS,
        "holdout",
        "filter",
    )
    for sub in subs:
        (state / sub).mkdir(parents=True)
    write_json_atomic(stamp, fingerprint)
    return state


def dedup(
    inputs: list[Path],
    out: Path,
    settings: DedupSettings | None = None,
    *,
    decontaminate: Sequence[Path] = (),
    overwrite: bool = False,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Clean and deduplicate `inputs` into the folder `out`; returns the manifest.

    `settings` (`dedup_settings.DedupSettings`, SlimPajama's defaults when omitted) says what is
    done; `options` are fields of it to change, for a caller's convenience
    (`dedup(inputs, out, min_chars=0)`). `decontaminate`: eval files or folders, for SlimPajama's
    SHA-256 decontamination (and, with `decontaminate_ngrams` N, the removal of kept documents
    that share N consecutive words with an eval text)."""
    from rich.console import Console

    try:
        settings = replace(settings or DedupSettings(), **options)
    except TypeError as e:  # an unknown option: the dataclass names it
        raise LmpipeError(f"dedup settings: {e}") from None
    if settings.decontaminate_ngrams and not decontaminate:
        raise LmpipeError(
            "dedup settings: --decontaminate-ngrams needs eval files (--decontaminate)"
        )
    inputs = [Path(p) for p in inputs]
    skipped: list[Path] = []
    files = find_inputs(inputs, skipped)
    sources = [source_of(f, inputs) for f in files]
    evals = find_inputs(decontaminate) if decontaminate else []
    out = Path(out)
    manifest_settings = settings.manifest()
    # A resumed run must read what the killed one read: same files, sizes and times.
    fingerprint = {
        "lmpipe_version": lmpipe_version(),
        "state_layout": steps.STATE_LAYOUT,
        # Not an output setting, but it sets the partitions and pair buckets the units write.
        "part_entries": settings.part_entries,
        "settings": manifest_settings,
        # The names too (as given, and each file's source): the finished units' markers hold
        # them, and the same files named another way must not resume into the first names.
        "inputs": [
            [str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns, str(f), source]
            for f, source in zip(files, sources, strict=True)
        ],
        "evals": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in evals],
    }
    bar = StepBar(progress)

    # The files found too: a link inside an input folder may point anywhere, the output included.
    reads = [*inputs, *map(Path, decontaminate), *files, *evals]
    with staged_output(out, stage="dedup", reads=reads, overwrite=overwrite, resume=True) as work:
        try:
            state = _prepare_state(work, fingerprint)
            state = state.resolve()  # tasks may run in another working folder (Ray workers)
            with Runner(settings.workers, settings.engine) as runner, bar:
                done = _steps(
                    runner, bar, state, files=files, s=settings, sources=sources, evals=evals
                )
        except TaskLost:
            raise  # a worker died, not the input: the finished units stay for the rerun
        except LmpipeError:
            # Bad input or settings: a rerun would fail the same way, so nothing is kept.
            shutil.rmtree(work, ignore_errors=True)
            raise
        # Before the manifest (which marks the folder finished); not among its outputs, so the
        # manifest is the same with or without matplotlib.
        plotted = write_cluster_png(done.cluster_sizes, work / PNG)
        manifest = write_manifest(
            work,
            "dedup",
            settings=manifest_settings,
            inputs=[
                {"path": str(f), "sha256": sha256_file(f), "bytes": f.stat().st_size, **bad}
                for f, bad in zip(files, done.invalid, strict=True)
            ],
            skipped_inputs=[str(f) for f in skipped],  # other files in the input folders
            decontaminate=[
                {"path": str(f), "sha256": sha256_file(f), **info}
                for f, info in zip(evals, done.eval_info, strict=True)
            ],
            outputs=done.outputs,
            counts=done.counts,
            cluster_sizes=done.cluster_sizes,
        )
        shutil.rmtree(state)  # after the manifest: a run killed between the two resumes at the end
    if progress:
        print_summary(done.counts, Console())
        print_invalid(Console(), manifest["inputs"] + manifest["decontaminate"])
        # a failure to draw was a warning already; only a missing matplotlib is said here
        if not plotted and not cluster_plot.have_matplotlib():
            Console().print(NO_PLOT, markup=False)  # "[plot]" is not a rich tag
    return manifest


@dataclass(frozen=True)
class StepResults:
    """What the steps give the manifest."""

    counts: dict[str, Any]  # "total" and "sources": bucket -> documents and bytes
    outputs: list[dict[str, Any]]  # the manifest's output files
    eval_info: list[dict[str, Any]]  # per eval file, what reading it found
    cluster_sizes: dict[str, int]  # duplicate cluster size -> clusters
    invalid: list[dict[str, Any]]  # per input file, its invalid lines (count, first examples)


def _steps(
    runner: Runner,
    bar: StepBar,
    state: Path,
    *,
    files: list[Path],
    s: DedupSettings,
    sources: list[str],
    evals: list[Path],
) -> StepResults:
    """The map-reduce of `dedup_steps`, then the stage's listing, counts, outputs, cluster sizes
    and each input's invalid lines (count and first examples)."""
    n = range(len(files))
    # Absolute (tasks may run in another working folder: Ray workers), but by the name as given,
    # links not followed: the format is read from the name, and a Hugging Face snapshot's
    # `train.jsonl.zst` is a link to `blobs/<sha>`, which has no suffix to read it by.
    absolute = [Path(os.path.abspath(f)) for f in files]
    absolute_evals = [Path(os.path.abspath(e)) for e in evals]
    # The eval data first: it does not depend on the corpus, and a bad eval file under --strict
    # must stop the run before hours of dedup, not after.
    eval_info = _run_step(
        runner, bar, "eval data", kept_steps.eval_file,
        [(state, e, path, s) for e, path in enumerate(absolute_evals)],
        [steps.marker(state, "evals", e) for e in range(len(evals))],
    )  # fmt: skip
    scans = _run_step(
        runner, bar, "fix, normalise" + (", MinHash" if s.near else ""), steps.scan_file,
        [(state, f, absolute[f], s) for f in n],
        [steps.marker(state, "scan", f) for f in n],
    )  # fmt: skip
    listed = [f for f in n if scans[f]["not_short"]]  # an empty key file cannot be mapped
    docs = sum(scan["not_short"] for scan in scans)
    if s.exact:
        parts = max(1, math.ceil(docs / s.part_entries))
        _run_step(
            runner, bar, "exact duplicates", steps.exact_partition,
            [(state, p, parts, listed) for p in range(parts)],
            [steps.marker(state, "exact", p) for p in range(parts)],
        )  # fmt: skip
    sizes: list[int] = []
    units: list[tuple[int, int, int]] = []
    if s.near:
        sizes, units = _near_steps(runner, bar, state, s, listed, docs * s.bands_rows[0])
    names = [str(f) for f in files]
    decided = _run_step(
        runner, bar, "components", steps.decide_all,
        [(state, names, s, sizes, units)], [steps.marker(state, "decide")],
    )  # fmt: skip
    if s.decontaminate_ngrams:
        _run_step(
            runner, bar, "eval n-grams", kept_steps.eval_ngram_union,
            [(state, len(evals))], [steps.marker(state, "eval_union")],
        )  # fmt: skip
        _run_step(
            runner, bar, "eval n-gram overlap", kept_steps.ngram_file,
            [(state, f, s.decontaminate_ngrams, [str(e) for e in evals]) for f in n],
            [steps.marker(state, NGRAMS, f) for f in n],
        )  # fmt: skip
    if s.holdout > 0:
        _run_step(
            runner, bar, "holdout", kept_steps.holdout_file,
            [(state, f, s) for f in n],
            [steps.marker(state, "holdout", f) for f in n],
        )  # fmt: skip
    filtered = _run_step(
        runner, bar, "write kept documents", kept_steps.filter_file,
        [(state, f, names[f], sources[f], s) for f in n],
        [steps.marker(state, "filter", f) for f in n],
    )  # fmt: skip

    # The listing, counts and outputs: small, so redone whole on a resume.
    work = state.parent
    counts: dict[str, dict[str, dict[str, int]]] = {}
    outputs = []
    with steps.ZstdLines(work / REMOVED) as removed:
        for f in n:
            for source, buckets in filtered[f]["counts"].items():
                c = counts.setdefault(source, _empty_counts())
                for bucket, add in buckets.items():
                    for unit in ("documents", "bytes"):
                        c[bucket][unit] += add[unit]
            with open(state / "filter" / f"{f:05d}.removed.jsonl", "rb") as listing:
                for line in listing:
                    removed.write_line(line)
            if filtered[f]["kept"]:
                name = steps.part_name(f)
                outputs.append(_output(work, name, "documents", filtered[f]["kept"]))
            if filtered[f]["held_out"]:
                name = f"{steps.HOLDOUT}/{steps.part_name(f)}"
                outputs.append(_output(work, name, "holdout", filtered[f]["held_out"]))
    outputs.append(_output(work, REMOVED, "removed", removed.lines))
    per_source = dict(sorted(counts.items()))  # by name, whatever order files name them in
    total = {
        b: {u: sum(c[b][u] for c in per_source.values()) for u in ("documents", "bytes")}
        for b in ("input", *BUCKETS)
    }
    check_counts(total, "all sources")
    for name, c in per_source.items():
        check_counts(c, name)
    invalid = [
        {k: scan[k] for k in ("invalid", "invalid_examples", "blank_lines")} for scan in scans
    ]
    return StepResults(
        # The total apart from the sources: a source may be named anything, "total" included.
        counts={"total": total, "sources": per_source},
        outputs=outputs,
        eval_info=eval_info,
        cluster_sizes=decided[0]["cluster_sizes"],
        invalid=invalid,
    )


def _output(work: Path, name: str, kind: str, documents: int) -> dict[str, Any]:
    """A manifest `outputs` entry: the file, what it holds, its sha256 and its documents."""
    return {"file": name, "kind": kind, "sha256": sha256_file(work / name), "documents": documents}


def _near_steps(
    runner: Runner,
    bar: StepBar,
    state: Path,
    s: DedupSettings,
    listed: list[int],
    keys: int,
) -> tuple[list[int], list[tuple[int, int, int]]]:
    """LSH, candidate pairs and their verification: the pairs of each pair bucket and the verify
    units, for `decide_all`. `listed`: the files with documents that are not short; `keys`: the
    band keys their scans wrote."""
    parts = max(1, math.ceil(keys / s.part_entries))
    # With verification, an edge to a bucket's first document can fail where one to a later
    # member holds: look at a few more members of each bucket.
    window = 8 if s.verify else 0
    # As many pair buckets as partitions: a bucket gets about as many pairs as a partition makes.
    buckets = parts
    _run_step(
        runner, bar, "LSH buckets", steps.lsh_partition,
        [(state, p, parts, listed, window, buckets) for p in range(parts)],
        [steps.marker(state, "lsh", p) for p in range(parts)],
    )  # fmt: skip
    merged = _run_step(
        runner, bar, "candidate pairs", steps.merge_bucket,
        [(state, q, parts) for q in range(buckets)],
        [steps.marker(state, "pairs", q) for q in range(buckets)],
    )  # fmt: skip
    sizes = [m["pairs"] for m in merged]
    units = steps.verify_units(sizes) if s.verify else []
    if units:
        holding: dict[int, list[int]] = {}  # input file -> the pair buckets with its documents
        for q, m in enumerate(merged):
            for f in m["files"]:
                holding.setdefault(f, []).append(q)
        involved = sorted(holding)
        _run_step(
            runner, bar, "shingle sets", steps.shingle_sets_file,
            [(state, f, s.ngram, holding[f]) for f in involved],
            [steps.marker(state, "sets", f) for f in involved],
        )  # fmt: skip
        _run_step(
            runner, bar, "verify pairs", steps.verify_chunk,
            [(state, *unit, u, s.threshold) for u, unit in enumerate(units)],
            [steps.marker(state, "verify", u) for u in range(len(units))],
        )  # fmt: skip
    return sizes, units
