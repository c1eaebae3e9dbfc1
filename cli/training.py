"""The training commands: `train`, `plot`, `recipes`, `demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmpipe.cli.stage import Recipe, Sets, run_stage


def train(
    recipe: Recipe,
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
    set_: Sets = None,
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
    init_from: Annotated[
        Path | None,
        typer.Option(
            help="Start from these weights instead of a fresh initialisation: a run or model "
            "folder, or a Hugging Face folder (BTLM or GPT-2 layout); the recipe's model must be "
            "theirs."
        ),
    ] = None,
    peak_tflops: Annotated[
        float | None,
        typer.Option(
            min=0.001,
            help="One GPU's dense bf16 peak in TFLOP/s, for the MFU in metrics.jsonl (default: "
            "lmpipe's table of GPUs by name, e.g. H100 SXM / H200 989, A100 312).",
        ),
    ] = None,
    gpu_memory: Annotated[
        float | None,
        typer.Option(
            min=0.001,
            help="--dry-run: one GPU's memory in GiB, to warn when the run's estimate exceeds it "
            "(default: this machine's GPU, if any).",
        ),
    ] = None,
    world_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="--dry-run: plan for this many ranks (default: the launcher's WORLD_SIZE, or 1).",
        ),
    ] = None,
) -> None:
    """Train a GPT (ALiBi, SwiGLU, muP) with DeepSpeed on a recipe's sequence-length stages."""
    from functools import partial

    from lmpipe.train.data import parse_data, with_data
    from lmpipe.train.recipe import load_recipe

    recipe_obj = run_stage(load_recipe, recipe, set_ or [])
    sources = run_stage(parse_data, data or [])
    if dry_run:
        from lmpipe.train.plan import dry_run as print_dry_run

        run_stage(print_dry_run, recipe_obj, sources, world_size, gpu_memory)
        return
    if gpu_memory is not None or world_size is not None:  # a run's world is its launcher's
        typer.echo("error: --gpu-memory and --world-size go with --dry-run", err=True)
        raise typer.Exit(2)
    recipe_obj = run_stage(with_data, recipe_obj, sources)
    from lmpipe.dataprep.folders import writing_into
    from lmpipe.train.launch import run_rank
    from lmpipe.train.loop import train as run_train

    run_dir = run_dir or Path("runs") / recipe_obj.name
    train_here = partial(
        run_train,
        recipe_obj,
        None,
        run_dir,
        resume=resume,
        verify_data=verify_data,
        init_from=init_from,
        peak_tflops=peak_tflops,
    )
    run_stage(run_rank, writing_into(run_dir)(train_here))  # a failed write names the run folder


def plot(
    run_dirs: Annotated[
        list[Path], typer.Argument(metavar="RUN_DIR", help="Run folders to draw, overlaid.")
    ],
    out: Annotated[
        Path,
        typer.Option(
            "-o", "--out", help="The picture (.png, .svg, .pdf), outside every run folder read."
        ),
    ] = Path("loss.png"),
    size: Annotated[
        str, typer.Option(help="Width x height in pixels, at least 480x360.")
    ] = "1200x700",
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace -o even if it is not a picture lmpipe plot drew (one it drew is "
            "replaced without this).",
        ),
    ] = False,
) -> None:
    """Draw training and held-out loss against tokens for one or more runs into loss.png.

    Stage switches are marked, and the learning rate is drawn on a second axis."""
    from lmpipe.train.plot import plot as draw

    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        typer.echo(f"error: --size {size!r}: WIDTHxHEIGHT in pixels, e.g. 1200x700", err=True)
        raise typer.Exit(2) from None
    run_stage(draw, run_dirs, out, (width, height), overwrite=overwrite)


def recipes() -> None:
    """List the shipped recipes: parameters, tokens, training FLOPs and tokens per parameter."""
    from lmpipe.train.plan import print_recipes

    run_stage(print_recipes)


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
