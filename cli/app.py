"""`lmpipe`: the command line. Each command parses, then calls one stage function.

Heavy modules (torch, deepspeed, datasketch, tiktoken) are imported inside the command bodies, so
`lmpipe --help` stays fast; tests/cli/test_app.py checks that torch is not imported by it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from lmpipe.dataprep.errors import LmpipeError

app = typer.Typer(
    name="lmpipe",
    help="Pretrain language models the BTLM / Cerebras-GPT way: dedup -> tokenize -> train -> eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")


@app.callback()
def launcher_options(
    local_rank: Annotated[
        int | None, typer.Option("--local_rank", "--local-rank", hidden=True)
    ] = None,
) -> None:
    """Pretrain language models the BTLM / Cerebras-GPT way: dedup -> tokenize -> train -> eval."""
    # The deepspeed launcher puts --local_rank=N before the command; the rank is taken from the
    # environment (LOCAL_RANK), which that launcher sets as well.


def run_stage(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call a stage; a user error becomes one line on stderr and exit status 2."""
    try:
        return fn(*args, **kwargs)
    except LmpipeError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: the output folder was not published", err=True)
        raise typer.Exit(130) from None


Inputs = Annotated[
    list[Path],
    typer.Argument(
        help="Input .jsonl / .jsonl.zst / .jsonl.gz / .parquet files or folders (searched recursively)."
    ),
]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Replace the output folder if it exists.")
]
Strict = Annotated[
    bool,
    typer.Option(
        "--strict/--skip-invalid",
        help="Stop at the first bad line (not JSON, not UTF-8, no string 'text', an empty or "
        "truncated file) with its file and line; by default bad lines are counted per file, "
        "reported and listed, and the rest is processed.",
    ),
]


@app.command()
def dedup(
    inputs: Inputs,
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder for the kept documents.")],
    min_chars: Annotated[
        int,
        typer.Option(
            help="Drop documents shorter than this after normalisation (SlimPajama: 200; "
            "0: no short filter)."
        ),
    ] = 200,
    fix_text: Annotated[
        bool,
        typer.Option(
            "--fix-text/--no-fix-text",
            help="Repair each text with ftfy.fix_text, NFC (SlimPajama's first step); without "
            "it texts pass through byte for byte.",
        ),
    ] = True,
    exact: Annotated[
        bool,
        typer.Option(
            "--exact/--no-exact",
            help="Remove exact duplicates of the normalised text first (without it the copies "
            "are removed as near duplicates, with more work).",
        ),
    ] = True,
    near: Annotated[
        bool,
        typer.Option(
            "--near/--no-near",
            help="Remove near duplicates (MinHash-LSH over character n-grams, SlimPajama's fuzzy "
            "step); without it only exact duplicates go, several times faster.",
        ),
    ] = True,
    threshold: Annotated[
        float,
        typer.Option(help="Jaccard similarity that counts as a near-duplicate (SlimPajama: 0.8)."),
    ] = 0.8,
    num_perm: Annotated[int, typer.Option(help="MinHash permutations (SlimPajama: 128).")] = 128,
    ngram: Annotated[
        int, typer.Option(help="Character n-gram size of the MinHash shingles (SlimPajama: 13).")
    ] = 13,
    hash_scheme: Annotated[
        str,
        typer.Option(
            "--hash",
            help="Signatures: oph (one-permutation MinHash, several times faster), sha1 "
            "(datasketch 1.5.9 / SlimPajama, value for value) or affine32 (datasketch 2.0).",
        ),
    ] = "oph",
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify",
            help="Keep only candidate pairs whose exact n-gram Jaccard reaches --threshold "
            "(--hash sha1 --no-verify is SlimPajama's run).",
        ),
    ] = True,
    lsh_threshold: Annotated[
        float | None,
        typer.Option(
            help="Jaccard the LSH bands are tuned for (default: --threshold - 0.2 with "
            "--verify, else --threshold)."
        ),
    ] = None,
    keep: Annotated[
        str, typer.Option(help="Document kept per group: first (input order) or longest.")
    ] = "first",
    holdout: Annotated[
        float,
        typer.Option(
            help="Fraction of the kept documents held out (by a seeded hash of their text) into "
            "OUT/_holdout/; training drops any document with a held-out text (SlimPajama: 0.0017)."
        ),
    ] = 0.0,
    decontaminate: Annotated[
        list[Path] | None,
        typer.Option(
            help="Eval data (.jsonl/.jsonl.zst/.jsonl.gz/.parquet files or folders; repeatable): kept "
            "documents whose exact text (SHA-256 after ftfy) is an eval text are removed."
        ),
    ] = None,
    decontaminate_field: Annotated[
        str, typer.Option(help="Field of the eval records to compare (dotted for nested).")
    ] = "text",
    decontaminate_ngrams: Annotated[
        int,
        typer.Option(
            help="Also remove kept documents that share any run of this many consecutive words "
            "(of the normalised text) with an eval text; 13 is GPT-3's choice, 0 compares "
            "exact texts only."
        ),
    ] = 0,
    source_field: Annotated[
        str | None,
        typer.Option(
            help="Count sources by this field (dotted, e.g. meta.redpajama_set_name) instead "
            "of each file's folder; a record without it is an invalid line."
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            "-j",
            "--workers",
            help="Processes (or Ray CPUs) for every step; output is identical for any number.",
        ),
    ] = 1,
    engine: Annotated[
        str,
        typer.Option(
            help="local (process pool) or ray (Ray tasks; the cluster at RAY_ADDRESS, else a "
            "local instance; needs `pip install 'lmpipe\\[ray]'`). Same output either way."
        ),
    ] = "local",
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
        exact=exact,
        near=near,
        threshold=threshold,
        num_perm=num_perm,
        ngram=ngram,
        hash_scheme="legacy" if hash_scheme == "sha1" else hash_scheme,
        verify=verify,
        lsh_threshold=lsh_threshold,
        keep=keep,
        holdout=holdout,
        decontaminate=decontaminate or [],
        decontaminate_field=decontaminate_field,
        decontaminate_ngrams=decontaminate_ngrams,
        source_field=source_field,
        workers=workers,
        engine=engine,
        strict=strict,
        overwrite=overwrite,
    )


@app.command()
def tokenize(
    inputs: Inputs,
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder for the token shards.")],
    holdout: Annotated[
        float,
        typer.Option(
            help="Share of documents held out for evaluation, chosen by a seeded hash (SlimPajama: 0.0017)."
        ),
    ] = 0.0017,
    seed: Annotated[int, typer.Option(help="Seed of the held-out choice.")] = 0,
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


@app.command()
def inspect(
    folder: Annotated[Path, typer.Argument(help="A token shard folder from `lmpipe tokenize`.")],
    decode: Annotated[
        Path | None,
        typer.Option(
            help='Also write every document back as JSON lines ({"text": ...}) to this file, in shard order.'
        ),
    ] = None,
    verify: Annotated[
        bool, typer.Option(help="Check every shard's sha256 against the manifest.")
    ] = True,
) -> None:
    """Summarise a token shard folder (tokenizer, counts, lengths) and verify its checksums."""
    from lmpipe.dataprep.inspection import inspect_shards

    run_stage(inspect_shards, folder, decode=decode, verify=verify)


@app.command()
def train(
    recipe: Annotated[
        str, typer.Option(help="A shipped recipe name (tiny, btlm3b) or a path to a YAML file.")
    ],
    data: Annotated[
        list[str] | None,
        typer.Option(
            help="Token folder from `lmpipe tokenize`, or a mixture: NAME=PATH:WEIGHT, repeated "
            "(weights normalised). Default: the recipe's data section."
        ),
    ] = None,
    run_dir: Annotated[
        Path | None,
        typer.Option(
            help="Run folder: checkpoints, logs, metrics.jsonl. Default: runs/<recipe name>."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a recipe value: --set model.n_layers=4 (repeatable)."),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Print the resolved recipe and derived numbers; train nothing."
        ),
    ] = False,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue from the latest checkpoint in the run folder."),
    ] = False,
    verify_data: Annotated[
        bool,
        typer.Option(
            help="Check every shard's sha256 against the data's manifest before training (rank 0, "
            "about a second per GB; skip it for huge data). File sizes are always checked."
        ),
    ] = True,
) -> None:
    """Train a GPT (ALiBi, SwiGLU, muP) with DeepSpeed on a recipe's sequence-length stages."""
    from lmpipe.train.data import parse_data, print_data_plan, with_data
    from lmpipe.train.recipe import load_recipe

    recipe_obj = run_stage(load_recipe, recipe, set_ or [])
    sources = run_stage(parse_data, data or [])
    if dry_run:
        from lmpipe.train.plan import print_plan

        if sources is not None or recipe_obj.data:  # the data is optional for a dry run
            recipe_obj = run_stage(with_data, recipe_obj, sources)
        plan = run_stage(print_plan, recipe_obj)
        print_data_plan(recipe_obj, plan)
        return
    recipe_obj = run_stage(with_data, recipe_obj, sources)
    import os

    from lmpipe.train.loop import finish_process
    from lmpipe.train.loop import train as run_train

    launched = "LOCAL_RANK" in os.environ  # torchrun or the deepspeed launcher started this rank
    run_dir = run_dir or Path("runs") / recipe_obj.name
    run_stage(run_train, recipe_obj, None, run_dir, resume=resume, verify_data=verify_data)
    if launched:
        finish_process()


@app.command(name="eval")
def eval_(
    run_dir: Annotated[
        Path,
        typer.Argument(help="A run folder from `lmpipe train` (its final model is evaluated)."),
    ],
    out: Annotated[
        Path | None,
        typer.Option("-o", "--out", help="Output folder for results. Default: RUN_DIR/eval."),
    ] = None,
    tasks: Annotated[
        str,
        typer.Option(
            help="Comma-separated tasks: perplexity, continuation, arc_easy, arc_challenge, piqa, ..."
        ),
    ] = "perplexity,continuation",
    data: Annotated[
        Path | None,
        typer.Option(
            help="Token shard folder whose held-out split is scored (perplexity, continuation)."
        ),
    ] = None,
    task_data: Annotated[
        Path | None,
        typer.Option(
            help="Folder of lm-eval-ready task files (one sub-folder per task).",
            envvar="LMPIPE_EVAL_DATA",
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="Score at most this many items per task.")
    ] = None,
    alibi_scale: Annotated[
        float | None,
        typer.Option(
            help="ALiBi position interpolation of every forward pass (slopes divided by it); "
            "default: the model's own, from its recipe's last stage (1 unless a long fine-tune "
            "set one)."
        ),
    ] = None,
    overwrite: Overwrite = False,
) -> None:
    """Score a trained model: zero-shot tasks the lm-evaluation-harness way, and perplexity."""
    from lmpipe.evals.run import evaluate

    run_stage(
        evaluate,
        run_dir,
        out or run_dir / "eval",
        tasks=[t for t in tasks.split(",") if t],
        data=data,
        task_data=task_data,
        limit=limit,
        alibi_scale=alibi_scale,
        overwrite=overwrite,
    )


mup_app = typer.Typer(name="mup", help="muP's tools: the coordinate check.", no_args_is_help=True)
app.add_typer(mup_app)


@mup_app.command("coord-check")
def coord_check(
    recipe: Annotated[str, typer.Option(help="A shipped recipe name or a YAML file (its model).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder: coord.json, coord.png.")],
    widths: Annotated[
        str, typer.Option(help="Comma-separated d_model values (multiples of the head size).")
    ] = "128,256,512,1024",
    steps: Annotated[int, typer.Option(help="AdamW steps per width.")] = 10,
    param: Annotated[
        str, typer.Option(help="mup, sp (the same model with every muP multiplier 1) or both.")
    ] = "both",
    data: Annotated[
        Path | None,
        typer.Option(
            help="Token folder whose training split gives the batches (default: seeded random tokens)."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a recipe value: --set model.n_layers=2 (repeatable)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = 8,
    seq_len: Annotated[
        int | None,
        typer.Option(help="Tokens per sequence (default: the first stage's, at most 256)."),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Base learning rate, constant (default: a tenth of the recipe's eta_base)."
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of the initialisation and the random tokens.")
    ] = 0,
    overwrite: Overwrite = False,
) -> None:
    """Train a recipe's model at several widths for a few steps and plot each activation's size
    against width: flat under muP, growing under the standard parametrisation."""
    from lmpipe.train.coord_check import CoordCheck
    from lmpipe.train.coord_check import coord_check as run_check
    from lmpipe.train.recipe import load_recipe

    try:
        width_list = tuple(int(w) for w in widths.split(",") if w.strip())
    except ValueError:
        typer.echo(
            f"error: --widths {widths!r}: comma-separated integers, e.g. 128,256,512", err=True
        )
        raise typer.Exit(2) from None
    recipe_obj = run_stage(load_recipe, recipe, set_ or [])
    params = ("mup", "sp") if param == "both" else (param,)
    check = CoordCheck(
        recipe_obj, width_list, steps=steps, params=params, data=data, batch_size=batch_size,
        seq_len=seq_len, lr=lr, seed=seed,
    )  # fmt: skip
    run_stage(run_check, check, out, overwrite=overwrite)


@app.command()
def recipes() -> None:
    """List the shipped recipes: parameters, tokens, training FLOPs and tokens per parameter."""
    from lmpipe.train.plan import print_recipes

    run_stage(print_recipes)


@app.command()
def demo(
    workdir: Annotated[
        Path, typer.Option(help="Folder for the demo's corpus, shards, run and results.")
    ] = Path("demo"),
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start over if the folder exists.")
    ] = False,
) -> None:
    """Run all four stages on the embedded corpus (Python's own documentation) in a few minutes."""
    from lmpipe.cli.demo import run_demo

    run_stage(run_demo, workdir, overwrite=overwrite)


def main() -> None:
    app(prog_name="lmpipe")


if __name__ == "__main__":
    sys.exit(main())
