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

from lmpipe.dataprep.dedup_settings import DedupSettings as D
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
            help="Processes (or Ray CPUs) for every step; output is identical for any number.",
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
        hash_scheme="legacy" if hash_scheme == "sha1" else hash_scheme,
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
    from lmpipe.train.data import parse_data, print_data_plan, with_data
    from lmpipe.train.recipe import load_recipe

    recipe_obj = run_stage(load_recipe, recipe, set_ or [])
    sources = run_stage(parse_data, data or [])
    if dry_run:
        from lmpipe.train.plan import print_plan

        if sources is not None or recipe_obj.data:  # the data is optional for a dry run
            recipe_obj = run_stage(with_data, recipe_obj, sources)
        import os

        from lmpipe.train.memory import local_gpu_memory, print_memory

        world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
        plan = run_stage(print_plan, recipe_obj, world)
        print_data_plan(recipe_obj, plan)
        print_memory(recipe_obj, plan, gpu_memory or local_gpu_memory())
        return
    if gpu_memory is not None or world_size is not None:  # a run's world is its launcher's
        typer.echo("error: --gpu-memory and --world-size go with --dry-run", err=True)
        raise typer.Exit(2)
    recipe_obj = run_stage(with_data, recipe_obj, sources)
    import os

    from lmpipe.train.guard import RunStopped
    from lmpipe.train.launch import finish_process
    from lmpipe.train.loop import train as run_train

    launched = "LOCAL_RANK" in os.environ  # torchrun or the deepspeed launcher started this rank
    run_dir = run_dir or Path("runs") / recipe_obj.name

    def train_run() -> None:
        try:
            run_train(recipe_obj, None, run_dir, resume=resume, verify_data=verify_data,
                      init_from=init_from, peak_tflops=peak_tflops)  # fmt: skip
        except RunStopped as e:
            if not launched:
                raise
            # Every rank stops at the same step (the guard decides on all-reduced numbers): one
            # line, from rank 0, and the clean end of a launched rank, with status 2.
            if os.environ.get("RANK") == "0":
                typer.echo(f"error: {e}", err=True)
            finish_process(2)

    run_stage(train_run)
    if launched:
        finish_process()


@app.command(name="eval")
def eval_(
    model: Annotated[
        list[str],
        typer.Argument(
            help="The model: a run folder from `lmpipe train`, or a Hugging Face folder in BTLM's "
            "or GPT-2's layout (hf:PATH, or any folder holding a config.json). With --compare: "
            "results.json files, or folders holding one.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--out",
            help="Output folder for results. Default: RUN_DIR/eval for a run, ./NAME-eval for a "
            "Hugging Face folder NAME.",
        ),
    ] = None,
    tasks: Annotated[
        str,
        typer.Option(
            help="Comma-separated tasks and suites. Tasks: perplexity, continuation, long_context, "
            "arc_easy, arc_challenge, boolq, hellaswag, lambada_openai, openbookqa, piqa, "
            "social_iqa, winogrande, wikitext. Suites: cerebras-gpt (the Cerebras-GPT card's "
            "seven 0-shot tasks), btlm (BTLM-3B-8K's 0-shot tasks that exist offline; not "
            "included: MMLU, TruthfulQA, the code and long-context tasks)."
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
    compare: Annotated[
        bool,
        typer.Option(
            "--compare",
            help="Evaluate nothing: print the given results side by side, a row per task and "
            "metric, a column per model.",
        ),
    ] = False,
    overwrite: Overwrite = False,
) -> None:
    """Score a model (a run, or a published Hugging Face model): zero-shot tasks the
    lm-evaluation-harness way, and perplexity. --compare prints results side by side."""
    if compare:
        from lmpipe.evals.compare import print_comparison

        run_stage(print_comparison, [Path(p) for p in model])
        return
    if len(model) != 1:
        typer.echo(f"error: one model to evaluate, got {len(model)} (or --compare)", err=True)
        raise typer.Exit(2)
    from lmpipe.evals.run import evaluate

    run_stage(
        evaluate,
        model[0],
        out,
        tasks=[t for t in tasks.split(",") if t],
        data=data,
        task_data=task_data,
        limit=limit,
        alibi_scale=alibi_scale,
        overwrite=overwrite,
    )


@app.command()
def generate(
    model: Annotated[
        Path,
        typer.Argument(
            help="A run folder, a model folder, or a Hugging Face folder (BTLM layout)."
        ),
    ],
    prompt: Annotated[str | None, typer.Option(help="The text to continue.")] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="A UTF-8 file of prompts, one per line, each run alone.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per prompt at most.")] = 64,
    temperature: Annotated[
        float, typer.Option(help="Softmax temperature; 0 is greedy (argmax).")
    ] = 0.8,
    top_k: Annotated[
        int, typer.Option(help="Draw from the K most likely tokens only (0: all).")
    ] = 200,
    top_p: Annotated[
        float,
        typer.Option(help="Then from the smallest set holding probability P (nucleus; 1: all)."),
    ] = 1.0,
    seed: Annotated[
        int, typer.Option(help="Seed of the sampling: the same seed, the same text.")
    ] = 0,
    alibi_scaling: Annotated[
        str | None,
        typer.Option(
            help="ALiBi position interpolation: none, dynamic (slopes / max(1, keys / training "
            "length), growing with the text) or a fixed FACTOR. Default: dynamic for ALiBi models."
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="cpu or cuda (default: cuda when there is one).")
    ] = None,
) -> None:
    """Continue prompts with a trained model (KV cache); print each completion and tokens/s."""
    from lmpipe.train.generate import GenerateSettings
    from lmpipe.train.generate import generate as run_generate

    settings = GenerateSettings(
        model=model, prompt=prompt, prompts_file=prompts, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        alibi_scaling=alibi_scaling, device=device,
    )  # fmt: skip
    result = run_stage(run_generate, settings)
    for c in result.completions:
        end = "end of text" if c.stopped_at_eos else f"{len(c.tokens)} tokens"
        typer.echo(f"--- prompt ({c.prompt_tokens} tokens), completion ({end}):")
        typer.echo(c.prompt + c.text)
    typer.echo(
        f"{result.new_tokens} new tokens in {result.seconds:.2f} s: "
        f"{result.tokens_per_second:.1f} tokens/s on {result.device}; "
        f"ALiBi scaling {result.alibi_scaling}"
    )


@app.command(name="export")
def export(
    run_dir: Annotated[
        Path, typer.Argument(help="A run folder from `lmpipe train`, or a model folder.")
    ],
    out: Annotated[
        Path, typer.Option("-o", "--out", help="Output folder: a Hugging Face model (BTLM layout).")
    ],
    dtype: Annotated[
        str, typer.Option(help="Weights as fp32 or bf16 (the ALiBi slopes stay fp32).")
    ] = "fp32",
    overwrite: Overwrite = False,
) -> None:
    """Write a trained model as a Hugging Face folder (safetensors, BTLM's config and modeling
    code for trust_remote_code, GPT-2's tokenizer)."""
    from lmpipe.train.hf import export_model

    run_stage(export_model, run_dir, out, dtype=dtype, overwrite=overwrite)
    typer.echo(f"exported to {out}")


@app.command(name="import")
def import_(
    hf_dir: Annotated[
        Path,
        typer.Argument(
            help="A Hugging Face folder: BTLM layout (lmpipe's exports, cerebras/btlm-3b-8k-base, "
            "Cerebras-GPT-muP) or GPT-2 layout (Cerebras-GPT)."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "-o", "--out", help="Output model folder for `lmpipe eval` and `train --init-from`."
        ),
    ],
    overwrite: Overwrite = False,
) -> None:
    """Read a Hugging Face model into an lmpipe model folder (model.pt + recipe.yaml), checking
    that lmpipe runs exactly what it holds."""
    from lmpipe.train.hf import import_model

    run_stage(import_model, hf_dir, out, overwrite=overwrite)
    typer.echo(f"imported to {out}")


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
    from lmpipe.train.recipe import load_recipe, recipe_file

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
        seq_len=seq_len, lr=lr, seed=seed, recipe_file=recipe_file(recipe),
    )  # fmt: skip
    run_stage(run_check, check, out, overwrite=overwrite)


def _split(option: str, text: str | None, kind: type) -> tuple:
    """A comma-separated option (`--widths 128,256`) as a tuple of `kind`."""
    if not text:
        return ()
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise LmpipeError(f"{option} {text!r}: comma-separated {kind.__name__}s") from None


@app.command()
def sweep(
    folder: Annotated[
        Path | None,
        typer.Argument(help="A finished sweep folder, with --best: read its best point."),
    ] = None,
    recipe: Annotated[
        str | None, typer.Option(help="A shipped recipe name (proxy) or a YAML file.")
    ] = None,
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
        str | None,
        typer.Option(
            help="mup, sp, mup-uncorrected (muP without SμPar's density correction) or a list: "
            "mup,sp (default: the recipe's parametrisation)."
        ),
    ] = None,
    tokens: Annotated[
        int | None,
        typer.Option(
            help="Tokens per point (stages and warmup scaled alike; default the recipe's)."
        ),
    ] = None,
    val_tokens: Annotated[
        int | None,
        typer.Option(help="Held-out tokens scored at the end of each point (default 65,536)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random search's draws.")] = 0,
    jobs: Annotated[
        int,
        typer.Option(
            "-j", "--jobs", help="Points at once: processes sharing the CPUs, or one per GPU."
        ),
    ] = 1,
    engine: Annotated[
        str,
        typer.Option(
            help="local (processes here) or ray (Ray tasks: the cluster at RAY_ADDRESS, else a "
            "local instance of -j CPUs; one GPU a point where the cluster has GPUs)."
        ),
    ] = "local",
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a recipe value for every point (repeatable)."),
    ] = None,
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
    """Train a recipe at every point of a grid or random search (and widths, densities, SP/muP);
    resumable. With FOLDER --best: muP-transfer the best point's base values to a recipe."""
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

        run_stage(sweep_best, folder, target=target, write_recipe=write_recipe, print_set=print_set, overwrite=overwrite)  # fmt: skip
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
            widths=_split("--widths", widths, int), densities=_split("--densities", densities, float),
            params=_split("--param", param, str), tokens=tokens, val_tokens=val_tokens, seed=seed,
            jobs=jobs, engine=engine,
        )  # fmt: skip

    run_stage(run_sweep, run_stage(settings), out, overwrite=overwrite)


@app.command()
def scaling(
    run_dirs: Annotated[
        list[Path] | None, typer.Argument(help="Finished run folders to fit.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("-o", "--out", help="Output folder: fit.json, fit.png (or the recipes)."),
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
        str | None, typer.Option(help="--family: the base recipe (shipped name or YAML file).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="--family: override a base recipe value (repeatable)."),
    ] = None,
    overwrite: Overwrite = False,
) -> None:
    """Fit L(f) = (f/a)^b + c to finished runs' loss against training FLOPs; or, with --family,
    write compute-optimal recipes of several sizes from a base recipe."""
    if out is None:
        typer.echo("error: -o is required (the output folder)", err=True)
        raise typer.Exit(2)
    if family:
        if run_dirs or recipe is None or not sizes:
            typer.echo("error: --family takes --recipe and --sizes, not run folders", err=True)
            raise typer.Exit(2)
        from lmpipe.train.scaling import family as write_family

        size_list = [s for s in sizes.split(",") if s.strip()]
        run_stage(write_family, recipe, size_list, out, tokens_per_param=tokens_per_param, count=count, overrides=set_ or [], overwrite=overwrite)  # fmt: skip
        return
    if recipe or sizes or set_:
        typer.echo("error: --recipe, --sizes and --set go with --family", err=True)
        raise typer.Exit(2)
    from lmpipe.train.scaling import scaling as run_scaling

    run_stage(run_scaling, run_dirs or [], out, published=published, loss=loss, samples=bootstrap, overwrite=overwrite)  # fmt: skip


@app.command()
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
    size: Annotated[str, typer.Option(help="Width x height in pixels.")] = "1200x700",
) -> None:
    """Draw training and held-out loss against tokens (stage switches marked, the learning rate
    on a second axis) for one or more runs into loss.png."""
    from lmpipe.train.plot import plot as draw

    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        typer.echo(f"error: --size {size!r}: WIDTHxHEIGHT in pixels, e.g. 1200x700", err=True)
        raise typer.Exit(2) from None
    run_stage(draw, run_dirs, out, (width, height))


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
