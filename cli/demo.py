"""`lmpipe demo`: the four stages chained on the embedded corpus, in a few minutes on 2 CPU cores.

The corpus is real text every Python installation carries (the interpreter's help topics and the
standard library's docstrings) plus injected near-duplicates, exact copies and short documents,
so that dedup visibly removes something. Each stage is the same library function the commands
call; the demo only picks folders and settings:

    WORKDIR/raw      the corpus (two sources)          -> lmpipe dedup
    WORKDIR/clean    kept documents + manifest         -> lmpipe tokenize (5% held out)
    WORKDIR/tokens   token shards (train, heldout)     -> lmpipe train --recipe tiny
    WORKDIR/run      checkpoints, metrics, the model   -> lmpipe eval, lmpipe plot
    WORKDIR/loss.png the run's loss and learning rate against tokens
    WORKDIR/eval     results.json
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.figures import have_matplotlib, no_matplotlib
from lmpipe.dataprep.folders import check_output, claim_folder, clear_folder, lock_folder, owned_by

# The demo corpus is ~1,200 documents; SlimPajama's 0.17% would hold out two of them.
DEMO_HOLDOUT = 0.05


def run_demo(
    workdir: Path, overwrite: bool = False, recipe_overrides: list[str] | None = None
) -> dict:
    """Run the chain in `workdir`; returns each stage's manifest or summary (up to the training's
    when a signal stopped it: `stop_after_signal`). `recipe_overrides` (`dotted.key=value`)
    shorten the tiny recipe, for tests."""
    workdir = Path(workdir)
    check_output(workdir, [], what="demo folder")
    existed = workdir.exists() or workdir.is_symlink()
    if existed:
        if not overwrite:
            raise LmpipeError(f"{workdir}: already exists; pass --overwrite to start the demo over")
        if not owned_by(workdir, "demo"):  # never delete a folder the demo did not make
            raise LmpipeError(
                f"{workdir}: --overwrite only replaces an empty folder or an earlier demo's "
                "folder, and this is neither; choose another --workdir"
            )
    # Held for the whole demo: `--overwrite` from another shell never empties a running demo.
    with lock_folder(workdir, "demo"):
        if existed:
            clear_folder(workdir)
        claim_folder(workdir, "demo")
        return demo_chain(workdir, recipe_overrides or [])


def demo_chain(workdir: Path, recipe_overrides: list[str]) -> dict:
    """The four stages in `workdir`, which the demo holds (`run_demo`)."""
    from lmpipe.dataprep.corpus import write_demo_corpus
    from lmpipe.dataprep.dedup import dedup
    from lmpipe.dataprep.tokenize import tokenize
    from lmpipe.evals.run import evaluate
    from lmpipe.train.loop import train
    from lmpipe.train.plot import plot
    from lmpipe.train.recipe import load_recipe

    console = Console()
    timings: dict[str, float] = {}

    def stage(title: str) -> float:
        console.rule(f"[bold]{title}")
        return time.perf_counter()

    t = stage("corpus: Python's own documentation, with injected duplicates")
    injected = write_demo_corpus(workdir / "raw")
    console.print(
        f"{injected['documents']:,} documents ({injected['bytes'] / 1e6:.1f} MB) in "
        f"{len(injected['sources'])} sources; injected {injected['near_duplicates']} near "
        f"duplicates and {injected['exact_duplicates']} case/punctuation/whitespace copies "
        f"({injected['cross_source']} of them in the other source), and {injected['short']} "
        "short documents"
    )
    timings["corpus"] = time.perf_counter() - t

    t = stage(
        "1/4 lmpipe dedup (SlimPajama: ftfy NFC, <200-char filter, MinHash-LSH at Jaccard 0.8)"
    )
    dedup_manifest = dedup([workdir / "raw"], workdir / "clean")
    timings["dedup"] = time.perf_counter() - t

    t = stage("2/4 lmpipe tokenize (tiktoken GPT-2 BPE, packed uint16 shards)")
    tokens_manifest = tokenize([workdir / "clean"], workdir / "tokens", holdout=DEMO_HOLDOUT)
    timings["tokenize"] = time.perf_counter() - t

    t = stage("3/4 lmpipe train --recipe tiny (DeepSpeed, muP, ALiBi + SwiGLU, 64 -> 256 tokens)")
    recipe = load_recipe("tiny", recipe_overrides)
    summary = train(recipe, workdir / "tokens", workdir / "run")
    if summary["stopped"]:  # a SIGINT / SIGTERM: the run is unfinished, so there is no model
        stop_after_signal(summary, workdir, recipe_overrides)
        return {"dedup": dedup_manifest, "tokenize": tokens_manifest, "train": summary}
    print_loss_curve(console, workdir / "run" / "metrics.jsonl")
    if have_matplotlib():  # beside the run folder: a stage never writes into what it reads
        plot([workdir / "run"], workdir / "loss.png", overwrite=True)  # the demo's own folder
    else:
        console.print(no_matplotlib(Path("loss.png")), markup=False)
    timings["train"] = time.perf_counter() - t

    t = stage(
        "4/4 lmpipe eval (held-out perplexity, multiple-choice continuation, lm-eval scoring)"
    )
    results = evaluate(
        workdir / "run",
        workdir / "eval",
        tasks=["perplexity", "continuation"],
        data=workdir / "tokens",
        task_data=None,
        limit=None,
    )
    timings["eval"] = time.perf_counter() - t

    console.rule("[bold]done")
    total = dedup_manifest["counts"]["total"]
    console.print(
        f"dedup kept {total['kept']['documents']:,} of {total['input']['documents']:,} documents; "
        f"tokenize wrote {tokens_manifest['totals']['tokens']:,} tokens; "
        f"train loss {summary['first_loss']:.2f} -> {summary['last_loss']:.2f}; "
        f"results in {workdir / 'eval' / 'results.json'}"
    )
    console.print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    return {"dedup": dedup_manifest, "tokenize": tokens_manifest, "train": summary, "eval": results}


def stop_after_signal(summary: dict[str, Any], workdir: Path, recipe_overrides: list[str]) -> None:
    """End the demo after a signal stopped its training: one line saying how to go on; then exit
    status 130 for SIGINT (as `run_stage`'s interrupt), 0 for SIGTERM (as `lmpipe train`)."""
    resume = shlex.join(
        ["lmpipe", "train", "--recipe", "tiny", "--data", str(workdir / "tokens"), "--run-dir",
         str(workdir / "run"), *(a for o in recipe_overrides for a in ("--set", o)), "--resume"]
    )  # fmt: skip
    start_over = shlex.join(["lmpipe", "demo", "--workdir", str(workdir), "--overwrite"])
    Console(stderr=True).print(
        f"demo: training stopped by {summary['stopped']} at step {summary['steps']:,}, so the demo "
        f"stops here; continue the run with `{resume}` or start over with `{start_over}`",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    if summary["stopped"] == "SIGINT":
        raise typer.Exit(130)


def print_loss_curve(console: Console, metrics_file: Path, points: int = 8) -> None:
    """A few rows of the loss curve: the first step, evenly spaced steps, and each stage's last."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    if not rows:
        return
    picks = sorted({0, len(rows) - 1, *range(0, len(rows), max(len(rows) // points, 1))})
    picks += [i for i in range(len(rows) - 1) if rows[i]["stage"] != rows[i + 1]["stage"]]
    table = Table(title="loss curve")
    for col in ("step", "tokens", "seq_len", "loss", "lr"):
        table.add_column(col, justify="right")
    for i in sorted(set(picks)):
        r = rows[i]
        table.add_row(
            str(r["step"]),
            f"{r['tokens']:,}",
            str(r["seq_len"]),
            f"{r['loss']:.3f}",
            f"{r['lr']:.2e}",
        )
    console.print(table)
