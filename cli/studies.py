"""The study commands: `mup coord-check`, `sweep`, `scaling` (tune a proxy, transfer, fit)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmpipe.cli.stage import RECIPE_HELP, Overwrite, Recipe, Sets, parse_list, run_stage

# --param's one grammar (coord-check and sweep): a comma list, `both` short for mup,sp.
PARAM_HELP = (
    "mup, sp (the same model with every muP multiplier 1), mup-uncorrected (muP without SμPar's "
    "density correction), or a comma list; both: mup,sp."
)


def parse_params(text: str | None) -> tuple[str, ...]:
    """--param as the parametrisations it names, `both` expanded, each once (`mup,both` would
    train mup twice); the stage checks the names."""
    names = parse_list("--param", text, str)
    expanded = (p for name in names for p in (("mup", "sp") if name == "both" else (name,)))
    return tuple(dict.fromkeys(expanded))


def coord_check(
    recipe: Recipe,
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder: coord.json, coord.png.")],
    widths: Annotated[
        str, typer.Option(help="Comma-separated d_model values (multiples of the head size).")
    ] = "128,256,512,1024",
    steps: Annotated[int, typer.Option(help="AdamW steps per width.")] = 10,
    param: Annotated[str, typer.Option(help=PARAM_HELP)] = "both",
    data: Annotated[
        Path | None,
        typer.Option(
            help="Token folder whose training split gives the batches (default: seeded random tokens)."
        ),
    ] = None,
    set_: Sets = None,
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
    """Check muP's transfer: each activation's size against width, flat under muP, not under SP.

    Trains a recipe's model at several widths (d_model) for a few AdamW steps and plots the mean
    |x| of each activation against width; under the standard parametrisation it grows."""
    from lmpipe.train.coord_check import CoordCheck
    from lmpipe.train.coord_check import coord_check as run_check
    from lmpipe.train.recipe import load_recipe, recipe_file

    width_list = run_stage(parse_list, "--widths", widths, int)
    params = run_stage(parse_params, param)
    recipe_obj = run_stage(load_recipe, recipe, set_ or [])
    check = CoordCheck(
        recipe_obj, width_list, steps=steps, params=params, data=data, batch_size=batch_size,
        seq_len=seq_len, lr=lr, seed=seed, recipe_file=recipe_file(recipe),
    )  # fmt: skip
    run_stage(run_check, check, out, overwrite=overwrite)


def sweep(
    folder: Annotated[
        Path | None,
        typer.Argument(
            metavar="FOLDER", help="A finished sweep folder, with --best: read its best point."
        ),
    ] = None,
    recipe: Annotated[str | None, typer.Option(help=RECIPE_HELP)] = None,
    data: Annotated[
        list[str] | None,
        typer.Option(help="Token folder, or NAME=PATH:WEIGHT sources (as lmpipe train)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("-o", "--out", help="Sweep folder: runs/, sweep.json, sweep.csv, sweep.png."),
    ] = None,
    grid: Annotated[
        list[str] | None,
        typer.Option(
            help="KEY=START:STOP:xFACTOR, KEY=START:STOP:+STEP or KEY=V1,V2 (numbers may be "
            "2^-10); repeated: every combination."
        ),
    ] = None,
    space: Annotated[
        list[str] | None,
        typer.Option(help="Random search: KEY=loguniform:LOW:HIGH or KEY=uniform:LOW:HIGH."),
    ] = None,
    random: Annotated[int, typer.Option(help="Random points drawn from --space.")] = 0,
    widths: Annotated[
        str | None,
        typer.Option(help="d_model values, each a muP model of that width (base shapes kept)."),
    ] = None,
    densities: Annotated[
        str | None, typer.Option(help="model.density values (sparse muP), e.g. 1,0.5,0.25.")
    ] = None,
    param: Annotated[
        str | None, typer.Option(help=PARAM_HELP + " Default: the recipe's parametrisation.")
    ] = None,
    tokens: Annotated[
        int | None,
        typer.Option(
            help="Tokens per point (stages and warmup scaled alike; default the recipe's)."
        ),
    ] = None,
    val_tokens: Annotated[
        int | None,
        typer.Option(
            help="Held-out tokens scored at the end of each point (default: the recipe's "
            "validation.tokens, else 65,536)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random search's draws.")] = 0,
    jobs: Annotated[
        int,
        typer.Option(
            "-j",
            "--jobs",
            "--workers",
            help="Points at once: processes sharing the CPUs, or one per GPU; with --engine ray, "
            "Ray tasks (on a cluster too).",
        ),
    ] = 1,
    engine: Annotated[
        str,
        typer.Option(
            help="local (processes here) or ray (Ray tasks, -j at a time: on the cluster at "
            "RAY_ADDRESS, else a local instance of -j CPUs; one GPU a point where the cluster "
            "has GPUs)."
        ),
    ] = "local",
    set_: Sets = None,
    best: Annotated[
        bool, typer.Option("--best", help="Read FOLDER's best muP point (base values).")
    ] = False,
    write_recipe: Annotated[
        Path | None,
        typer.Option(help="With --best: write --target with the best base values as a recipe."),
    ] = None,
    print_set: Annotated[
        bool, typer.Option("--print-set", help="With --best: print the values as --set options.")
    ] = False,
    target: Annotated[
        str | None,
        typer.Option(help="With --best: the recipe to transfer to (default: the sweep's)."),
    ] = None,
    overwrite: Overwrite = False,
) -> None:
    """Train a recipe at every point of a grid or random search; FOLDER --best transfers the best.

    Points also span widths, densities and SP/muP; a sweep resumes where it stopped. With FOLDER
    --best: muP-transfer the best point's base values to a recipe."""
    from lmpipe.train.data import parse_data

    if best or folder is not None:
        if folder is None or not best or recipe or out:
            typer.echo(
                "error: read a sweep with `lmpipe sweep FOLDER --best`; run one with "
                "`lmpipe sweep --recipe R -o OUT ...`",
                err=True,
            )
            raise typer.Exit(2)
        from lmpipe.train.transfer import sweep_best

        run_stage(
            sweep_best,
            folder,
            target=target,
            write_recipe=write_recipe,
            print_set=print_set,
            overwrite=overwrite,
        )
        return
    if recipe is None or out is None or write_recipe or print_set or target:
        typer.echo(
            "error: a sweep needs --recipe and -o (--write-recipe, --print-set and --target go "
            "with FOLDER --best)",
            err=True,
        )
        raise typer.Exit(2)
    from lmpipe.train.sweep import sweep as run_sweep
    from lmpipe.train.sweep_plan import SweepSettings, parse_grid, parse_space

    def settings() -> SweepSettings:
        sources = parse_data(data or [])
        return SweepSettings(
            recipe=recipe, data=tuple(sources) if isinstance(sources, list) else sources,
            overrides=tuple(set_ or []), grid=tuple(parse_grid(g) for g in grid or []),
            space=tuple(parse_space(s) for s in space or []), random=random,
            widths=parse_list("--widths", widths, int), densities=parse_list("--densities", densities, float),
            params=parse_params(param), tokens=tokens, val_tokens=val_tokens, seed=seed,
            jobs=jobs, engine=engine,
        )  # fmt: skip

    run_stage(run_sweep, run_stage(settings), out, overwrite=overwrite)


def scaling(
    out: Annotated[
        Path, typer.Option("-o", "--out", help="Output folder: fit.json, fit.png (or the recipes).")
    ],
    run_dirs: Annotated[
        list[Path] | None,
        typer.Argument(metavar="RUN_DIR", help="Finished run folders to fit."),
    ] = None,
    published: Annotated[
        str | None, typer.Option(help="Also plot a published fit: cerebras-gpt.")
    ] = None,
    loss: Annotated[
        str,
        typer.Option(help="heldout (the last validation) or train (the last tenth of steps)."),
    ] = "heldout",
    bootstrap: Annotated[int, typer.Option(help="Bootstrap draws over runs.")] = 1000,
    family: Annotated[
        bool,
        typer.Option("--family", help="Write a compute-optimal family of recipes instead."),
    ] = False,
    sizes: Annotated[
        str | None,
        typer.Option(
            help="--family: widths (768) or parameter counts (111M, 1.3B), comma-separated."
        ),
    ] = None,
    tokens_per_param: Annotated[
        float, typer.Option(help="--family: training tokens a parameter (Chinchilla: 20).")
    ] = 20.0,
    count: Annotated[
        str,
        typer.Option(
            help="--family: count parameters in all (total, as Chinchilla and Cerebras-GPT) or "
            "without embeddings (non-embedding, Kaplan's N)."
        ),
    ] = "total",
    recipe: Annotated[
        str | None, typer.Option(help="--family: the base recipe. " + RECIPE_HELP)
    ] = None,
    set_: Sets = None,
    overwrite: Overwrite = False,
) -> None:
    """Fit L(f) = (f/a)^b + c to runs' loss against FLOPs; --family writes compute-optimal recipes.

    The fit takes finished runs' loss against their training FLOPs; with --family, compute-optimal
    recipes of several sizes are written from a base recipe (--recipe, --sizes, --set)."""
    if family:
        if run_dirs or recipe is None or not sizes:
            typer.echo("error: --family takes --recipe and --sizes, not run folders", err=True)
            raise typer.Exit(2)
        from lmpipe.train.scaling import family as write_family

        size_list = list(parse_list("--sizes", sizes, str))
        run_stage(
            write_family,
            recipe,
            size_list,
            out,
            tokens_per_param=tokens_per_param,
            count=count,
            overrides=set_ or [],
            overwrite=overwrite,
        )
        return
    if recipe or sizes or set_:
        typer.echo("error: --recipe, --sizes and --set go with --family", err=True)
        raise typer.Exit(2)
    from lmpipe.train.scaling import scaling as run_scaling

    run_stage(
        run_scaling,
        run_dirs or [],
        out,
        published=published,
        loss=loss,
        samples=bootstrap,
        overwrite=overwrite,
    )
