"""The data commands: `dedup`, `tokenize`, `inspect` (dataprep's stages)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmpipe.cli.stage import Inputs, Overwrite, Strict, run_stage
from lmpipe.dataprep.dedup_settings import DedupSettings as D


def dedup(
    inputs: Inputs,
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder for the kept documents.")],
    min_chars: Annotated[
        int,
        typer.Option(
            help="Drop documents shorter than this after normalisation (SlimPajama: 200; "
            "0: no short filter)."
        ),
    ] = D.min_chars,
    fix_text: Annotated[
        bool,
        typer.Option(
            "--fix-text/--no-fix-text",
            help="Repair each text as ftfy.fix_text does, NFC (SlimPajama's first step); without "
            "it texts pass through byte for byte.",
        ),
    ] = D.fix,
    fixer: Annotated[
        str,
        typer.Option(
            help="lmpipe (ftfy's exact output, several times faster on non-ASCII text) or ftfy "
            "(the library itself, the reference lmpipe's is tested against)."
        ),
    ] = D.fixer,
    exact: Annotated[
        bool,
        typer.Option(
            "--exact/--no-exact",
            help="Remove exact duplicates of the normalised text first (without it the copies "
            "are removed as near duplicates, with more work).",
        ),
    ] = D.exact,
    near: Annotated[
        bool,
        typer.Option(
            "--near/--no-near",
            help="Remove near duplicates (MinHash-LSH over character n-grams, SlimPajama's fuzzy "
            "step); without it only exact duplicates go, several times faster.",
        ),
    ] = D.near,
    threshold: Annotated[
        float,
        typer.Option(help="Jaccard similarity that counts as a near-duplicate (SlimPajama: 0.8)."),
    ] = D.threshold,
    num_perm: Annotated[
        int, typer.Option(help="MinHash permutations (SlimPajama: 128).")
    ] = D.num_perm,
    ngram: Annotated[
        int, typer.Option(help="Character n-gram size of the MinHash shingles (SlimPajama: 13).")
    ] = D.ngram,
    hash_scheme: Annotated[
        str,
        typer.Option(
            "--hash",
            help="Signatures: oph (one-permutation MinHash, several times faster), sha1 "
            "(datasketch 1.5.9 / SlimPajama, value for value) or affine32 (datasketch 2.0).",
        ),
    ] = D.hash_scheme,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify",
            help="Keep only candidate pairs whose exact n-gram Jaccard reaches --threshold "
            "(--hash sha1 --no-verify is SlimPajama's run).",
        ),
    ] = D.verify,
    lsh_threshold: Annotated[
        float | None,
        typer.Option(
            help="Jaccard the LSH bands are tuned for (default: --threshold - 0.2 with "
            "--verify, else --threshold)."
        ),
    ] = D.lsh_threshold,
    keep: Annotated[
        str, typer.Option(help="Document kept per group: first (input order) or longest.")
    ] = D.keep,
    holdout: Annotated[
        float,
        typer.Option(
            help="Fraction of the kept documents held out (by a seeded hash of their text) into "
            "OUT/_holdout/; training drops any document with a held-out text (SlimPajama: 0.0017)."
        ),
    ] = D.holdout,
    holdout_seed: Annotated[
        int, typer.Option(help="Seed of the holdout's hash (SlimPajama: 42).")
    ] = D.holdout_seed,
    decontaminate: Annotated[
        list[Path] | None,
        typer.Option(
            help="Eval data (.jsonl/.jsonl.zst/.jsonl.gz/.parquet files or folders; repeatable): kept "
            "documents whose exact text (SHA-256 after ftfy) is an eval text are removed."
        ),
    ] = None,
    decontaminate_field: Annotated[
        str, typer.Option(help="Field of the eval records to compare (dotted for nested).")
    ] = D.decontaminate_field,
    decontaminate_ngrams: Annotated[
        int,
        typer.Option(
            help="Also remove kept documents that share any run of this many consecutive words "
            "(of the normalised text) with an eval text; 13 is GPT-3's choice, 0 compares "
            "exact texts only."
        ),
    ] = D.decontaminate_ngrams,
    source_field: Annotated[
        str | None,
        typer.Option(
            help="Count sources by this field (dotted, e.g. meta.redpajama_set_name) instead "
            "of each file's folder; a record without it is an invalid line."
        ),
    ] = D.source_field,
    workers: Annotated[
        int,
        typer.Option(
            "-j",
            "--workers",
            help="Tasks at a time for every step: processes, or with --engine ray Ray tasks (on "
            "a cluster too); output is identical for any number.",
        ),
    ] = D.workers,
    engine: Annotated[
        str,
        typer.Option(
            help="local (process pool) or ray (Ray tasks; the cluster at RAY_ADDRESS, else a "
            "local instance; needs `pip install 'lmpipe\\[ray]'`). Same output either way."
        ),
    ] = D.engine,
    strict: Strict = False,
    overwrite: Overwrite = False,
) -> None:
    """Clean and deduplicate documents as SlimPajama did: ftfy NFC, short filter, MinHash-LSH.

    An interrupted run leaves OUT.partial/; the same command again resumes it."""
    from lmpipe.dataprep.dedup import dedup as run_dedup

    run_stage(
        run_dedup,
        inputs,
        out,
        min_chars=min_chars,
        fix=fix_text,
        fixer=fixer,
        exact=exact,
        near=near,
        threshold=threshold,
        num_perm=num_perm,
        ngram=ngram,
        hash_scheme=hash_scheme,
        verify=verify,
        lsh_threshold=lsh_threshold,
        keep=keep,
        holdout=holdout,
        holdout_seed=holdout_seed,
        decontaminate=decontaminate or (),
        decontaminate_field=decontaminate_field,
        decontaminate_ngrams=decontaminate_ngrams,
        source_field=source_field,
        workers=workers,
        engine=engine,
        strict=strict,
        overwrite=overwrite,
    )


def tokenize(
    inputs: Inputs,
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder for the token shards.")],
    holdout: Annotated[
        float,
        typer.Option(
            help="Share of documents held out for evaluation, chosen by a seeded hash (SlimPajama: 0.0017)."
        ),
    ] = 0.0017,
    seed: Annotated[
        int, typer.Option("--holdout-seed", "--seed", help="Seed of the held-out choice.")
    ] = 0,
    shard_tokens: Annotated[
        int, typer.Option(help="Tokens per shard file (uint16: 2 bytes each).")
    ] = 128 << 20,
    workers: Annotated[
        int,
        typer.Option(
            "-j",
            "--workers",
            help="Encoding threads (tiktoken releases the GIL); output is identical for any number.",
        ),
    ] = 1,
    split_by_field: Annotated[
        str | None,
        typer.Option(
            help="Write one token folder per value of this field (dotted: meta.redpajama_set_name) "
            "under OUT, for a mixture (`lmpipe train --data NAME=OUT/NAME:WEIGHT`)."
        ),
    ] = None,
    strict: Strict = False,
    overwrite: Overwrite = False,
) -> None:
    """Encode documents with GPT-2 BPE into packed uint16 token shards (train and held-out)."""
    from lmpipe.dataprep.tokenize import tokenize as run_tokenize

    run_stage(
        run_tokenize,
        inputs,
        out,
        holdout=holdout,
        seed=seed,
        shard_tokens=shard_tokens,
        strict=strict,
        overwrite=overwrite,
        workers=workers,
        split_by_field=split_by_field,
    )


def inspect(
    folder: Annotated[
        Path, typer.Argument(metavar="FOLDER", help="A token shard folder from `lmpipe tokenize`.")
    ],
    decode: Annotated[
        Path | None,
        typer.Option(
            help='Also write every document back as JSON lines ({"text": ...}) to this file, in shard order.'
        ),
    ] = None,
    verify_data: Annotated[
        bool,
        typer.Option(
            "--verify-data/--no-verify-data",
            "--verify/--no-verify",
            help="Check every shard's sha256 against the manifest (as train's --verify-data).",
        ),
    ] = True,
) -> None:
    """Summarise a token shard folder (tokenizer, counts, lengths) and verify its checksums."""
    from lmpipe.dataprep.inspection import inspect_shards

    run_stage(inspect_shards, folder, decode=decode, verify=verify_data)
