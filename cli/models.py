"""The commands that use a trained model: `eval`, `generate`, `export`, `import`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmpipe.cli.stage import Overwrite, parse_list, run_stage

# What eval and generate take as MODEL.
MODEL_HELP = (
    "The model: a run folder from `lmpipe train`, a model folder (model.pt + recipe.yaml, from "
    "`lmpipe import`), or a Hugging Face folder in BTLM's or GPT-2's layout (hf:PATH, or any "
    "folder holding a config.json)."
)


def eval_(
    model: Annotated[
        list[str],
        typer.Argument(
            metavar="MODEL",
            help=MODEL_HELP + " With --compare: results.json files, or folders holding one.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--out",
            help="Output folder for results. Default: RUN_DIR/eval for a run, NAME-eval beside "
            "a model folder NAME (model.pt + recipe.yaml), ./NAME-eval for a Hugging Face folder "
            "NAME.",
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
            help="Token shard folder whose held-out split is scored (perplexity, continuation, "
            "long_context)."
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
    """Score a model: zero-shot tasks the lm-evaluation-harness way, and perplexity.

    The model is a run, or a published Hugging Face model; --compare prints results side by
    side."""
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
        tasks=list(parse_list("--tasks", tasks, str)),
        data=data,
        task_data=task_data,
        limit=limit,
        alibi_scale=alibi_scale,
        overwrite=overwrite,
    )


def generate(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help=MODEL_HELP)],
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
        int,
        typer.Option(
            help="Seed of the sampling, afresh for each prompt: the same seed, the same text."
        ),
    ] = 0,
    alibi_scale: Annotated[
        str | None,
        typer.Option(
            "--alibi-scale",
            "--alibi-scaling",
            help="ALiBi position interpolation: none, dynamic (slopes / max(1, keys / training "
            "length), growing with the text) or a fixed FACTOR. Default: dynamic for ALiBi models.",
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
        alibi_scaling=alibi_scale, device=device,
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


def export(
    run_dir: Annotated[
        Path,
        typer.Argument(
            metavar="RUN_DIR", help="A run folder from `lmpipe train`, or a model folder."
        ),
    ],
    out: Annotated[
        Path, typer.Option("-o", "--out", help="Output folder: a Hugging Face model (BTLM layout).")
    ],
    dtype: Annotated[
        str, typer.Option(help="Weights as fp32 or bf16 (the ALiBi slopes stay fp32).")
    ] = "fp32",
    overwrite: Overwrite = False,
) -> None:
    """Write a trained model as a Hugging Face folder (BTLM layout, safetensors).

    The folder holds the weights as safetensors, BTLM's config and modeling code for
    trust_remote_code, and GPT-2's tokenizer."""
    from lmpipe.train.hf import export_model

    run_stage(export_model, run_dir, out, dtype=dtype, overwrite=overwrite)
    typer.echo(f"exported to {out}")


def import_(
    hf_dir: Annotated[
        Path,
        typer.Argument(
            metavar="HF_DIR",
            help="A Hugging Face folder: BTLM layout (lmpipe's exports, cerebras/btlm-3b-8k-base, "
            "Cerebras-GPT-muP) or GPT-2 layout (Cerebras-GPT).",
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
    """Read a Hugging Face model into an lmpipe model folder (model.pt + recipe.yaml).

    The import checks that lmpipe runs exactly what the folder holds."""
    from lmpipe.train.hf import import_model

    run_stage(import_model, hf_dir, out, overwrite=overwrite)
    typer.echo(f"imported to {out}")
