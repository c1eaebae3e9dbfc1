"""`lmpipe eval`: score a model and write `results.json` + `manifest.json` to a folder.

    evaluate(model, out, tasks=[...], data=shards_or_None, task_data=folder_or_None, limit=N)

The model is an lmpipe run (or model) folder, or a Hugging Face folder (`hf:PATH`, or any folder
holding a `config.json`: BTLM's layout or GPT-2's, read by `lmpipe.train.hf.load_hf_model`), so
a user's run and a published model are scored by the same code into the same table.
Tasks: `perplexity`, `continuation` and `long_context` read the held-out split of a token shard
folder (`data`); `long_context` scores windows of twice the model's training length,
`long_context@4096` windows of 4,096 tokens and `long_context@8x` of 8x the training length (one
task each, so several lengths sit side by side; `long_context.png` draws their loss by
position); the harness tasks (arc_easy, piqa, ...) read lm-eval-ready files under `task_data`;
a suite name (`SUITES`: cerebras-gpt, btlm) stands for its tasks. Each task's metrics are
{"value", "stderr"} plus its item count `n`; results.json holds them per task with the
settings; the output folder is published only when every task ran. Every input is read and
checked before the first task runs (the held-out split, each task file and its rows, each
long-context window against the held-out tokens), so no error comes after hours of scoring.
The model reads at most its training sequence length (the recipe's last stage) per forward pass.
The output folder may not be, contain or lie inside what eval reads (the model's folder, the
token data, the task files); the default is `RUN_DIR/eval` for a run, `NAME-eval` beside a model
folder NAME (model.pt + recipe.yaml) and `./NAME-eval` for a Hugging Face folder, which lies
inside what eval reads only when the working directory is inside that folder: then it is refused
like such an `-o`. `data` and `task_data` are read, and recorded in results.json, only when an
asked task reads them.
A task row whose gold label is not one of its choices, or whose prompt field or choice is not a
string, is an error naming the file, the line and the field (`tasks.py`); a request whose
context is only whitespace (no context token: the harness fails on it) names the task and item.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import sha256_file, staged_output, write_json_atomic, write_manifest
from lmpipe.dataprep.shards import TokenShards
from lmpipe.train.checkpoint import model_source

if TYPE_CHECKING:  # for annotations only: each is imported where it is used
    import tiktoken
    import torch
    from rich.table import Table

    from lmpipe.evals.lm import Progress

HELDOUT_TASKS = ("perplexity", "continuation", "long_context")
RESULTS = "results.json"

# `continuation` is at most this many items, made from the first DOCS_PER_ITEM x ITEMS held-out
# documents (distractors are drawn from all of them); --limit N scores the first N of its items.
CONTINUATION_ITEMS = 1000
CONTINUATION_DOCS_PER_ITEM = 4


# Task suites: the zero-shot tasks a paper or model card reports, as far as they exist here.
SUITES: dict[str, tuple[str, ...]] = {
    # Cerebras-GPT's model card: seven 0-shot tasks (seeds-spec 3.4).
    "cerebras-gpt": (
        "hellaswag", "piqa", "winogrande", "lambada_openai", "arc_easy", "arc_challenge",
        "openbookqa",
    ),
    # BTLM-3B-8K's 0-shot tasks (seeds-spec 1.6). Not here: MMLU (5-shot), TruthfulQA, and the
    # paper's code and long-context tasks (SCROLLS, LongEval).
    "btlm": (
        "arc_challenge", "arc_easy", "boolq", "hellaswag", "lambada_openai", "openbookqa", "piqa",
        "social_iqa", "winogrande",
    ),
}  # fmt: skip


def known_tasks() -> list[str]:
    from lmpipe.evals.tasks import EXTERNAL_TASKS

    return [*HELDOUT_TASKS, *EXTERNAL_TASKS]


LONG_CONTEXT = "long_context"


def base_task(name: str) -> str:
    """The task a name runs: `long_context@8x` is `long_context` at another length."""
    return LONG_CONTEXT if name.startswith(LONG_CONTEXT + "@") else name


def long_context_window(name: str) -> tuple[float, bool]:
    """A long-context task's window as (value, relative): `@N` is N tokens, `@Kx` K times the
    training length, no `@` twice the training length (where BTLM's card says interpolation
    still holds)."""
    _, at, spec = name.partition("@")
    if not at:
        return 2.0, True
    relative = spec.endswith("x")
    try:
        value = float(spec[:-1]) if relative else int(spec)
    except ValueError:
        value = 0
    if not (math.isfinite(value) and value > 0):
        raise LmpipeError(
            f"{name}: the window is long_context@TOKENS (long_context@4096) or "
            "long_context@TIMESx (long_context@8x, times the training length)"
        )
    return value, relative


def long_context_length(name: str, train_seq_len: int) -> int:
    """The window of a long-context task, in tokens, for a model trained to `train_seq_len`."""
    value, relative = long_context_window(name)
    length = round(value * train_seq_len) if relative else int(value)
    if length < 2:
        raise LmpipeError(f"{name}: a window of {length} token(s); it needs at least 2")
    return length


def expand_tasks(tasks: list[str]) -> list[str]:
    """Task names with each suite replaced by its tasks, in order, without repeats."""
    names = (name for t in tasks if t.strip() for name in SUITES.get(t.strip(), (t.strip(),)))
    return list(dict.fromkeys(names))


def check_tasks(tasks: list[str], data: Path | None, task_data: Path | None) -> list[str]:
    """The task list (suites expanded) without repeats; a problem with the names or with the
    options they need is an LmpipeError, before anything is read. The files the tasks read are
    checked next, still before any task runs (`read_inputs`, and in `evaluate` the long-context
    windows against the held-out split)."""
    names = expand_tasks(tasks)
    known = f"known tasks: {', '.join(known_tasks())}; suites: {', '.join(SUITES)}"
    if not names:
        raise LmpipeError(f"no task given; {known}")
    unknown = [t for t in names if base_task(t) not in known_tasks()]
    if unknown:
        raise LmpipeError(f"unknown task {', '.join(unknown)}; {known}")
    for name in names:
        if base_task(name) == LONG_CONTEXT:
            long_context_window(name)  # the form only; the length needs the model
    need_data = [t for t in names if base_task(t) in HELDOUT_TASKS]
    if need_data and data is None:
        raise LmpipeError(
            f"task {', '.join(need_data)} needs --data (a token shard folder with a held-out split)"
        )
    external = [t for t in names if base_task(t) not in HELDOUT_TASKS]
    if external and task_data is None:
        raise LmpipeError(
            f"task {', '.join(external)} needs --task-data (a folder of lm-eval-ready task files)"
        )
    if external and not Path(task_data).is_dir():  # type: ignore[arg-type]
        raise LmpipeError(f"{task_data}: no such folder (--task-data)")
    return names


def evaluate(
    model: str | Path,
    out: Path | None,
    *,
    tasks: list[str],
    data: Path | None,
    task_data: Path | None,
    limit: int | None,
    overwrite: bool = False,
    batch_size: int = 8,
    device: str | None = None,
    seed: int = 0,
    alibi_scale: float | None = None,
) -> dict[str, Any]:
    """Run the tasks on a run's final model or a Hugging Face model (`model_source`); the results
    dict that results.json holds. `out` None: the source's default output folder.
    `alibi_scale`: ALiBi interpolation of every forward pass; by default the one the model was
    last trained with (its recipe's last stage: 1, or a long fine-tune's fixed factor)."""
    names = check_tasks(tasks, data, task_data)
    # A folder no asked task reads is not recorded as an input (results.json, the manifest), nor
    # refused: --task-data may come from LMPIPE_EVAL_DATA, set for every eval.
    if not any(base_task(t) in HELDOUT_TASKS for t in names):
        data = None
    if all(base_task(t) in HELDOUT_TASKS for t in names):
        task_data = None
    source = model_source(model)
    out = Path(out) if out is not None else source.default_output()
    if limit is not None and limit < 1:
        raise LmpipeError(f"--limit must be at least 1, got {limit}")
    # NaN and infinity would pass a plain `> 0`: NaN scores every metric null, infinity removes
    # the position bias altogether.
    if alibi_scale is not None and not (math.isfinite(alibi_scale) and alibi_scale > 0):
        raise LmpipeError(f"--alibi-scale must be finite and > 0, got {alibi_scale:g}")
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lmpipe.dataprep.tokenizer import get_encoding

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    console = Console()
    # What eval reads: the model's folder (a run's `model/`, or the whole Hugging Face folder),
    # the token data and the task files; the output may sit beside a run's model (RUN_DIR/eval).
    reads = [source.folder(), data, task_data]
    with staged_output(out, stage="eval", reads=reads, overwrite=overwrite) as work:
        # Every task's input is read and checked before the first task runs: a missing file or a
        # bad row of the last task must not throw away hours of scoring the first ones.
        encoding = get_encoding()
        shards, items = read_inputs(
            names, data=data, task_data=task_data, limit=limit, seed=seed, encoding=encoding
        )
        gpt, recipe = source.load(device)
        max_length = recipe.stages[-1].seq_len
        if alibi_scale is None:
            alibi_scale = recipe.stages[-1].alibi_scale
        if alibi_scale != 1 and recipe.model.position != "alibi":
            raise LmpipeError("--alibi-scale: this model has learned positions, not ALiBi")
        if LONG_CONTEXT in map(base_task, names) and recipe.model.position != "alibi":
            raise LmpipeError(
                "long_context: this model has learned positions, which end at its training length"
            )
        check_continuations(items, encoding, max_length, task_data)
        for name in names:
            # its window needs the model's training length (shards: read for any held-out task)
            if base_task(name) == LONG_CONTEXT and shards is not None:
                length = long_context_length(name, max_length)
                if shards.n_tokens - 1 < length:
                    raise LmpipeError(
                        f"{name}: the held-out split of {data} has {shards.n_tokens} tokens, "
                        f"fewer than one window of {length + 1}"
                    )
        results: dict[str, Any] = {}
        columns = (
            TextColumn("{task.description:<16}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console, transient=False) as progress:
            for name in names:
                bar = progress.add_task(name, total=None)

                def advance(done: int, total: int, bar: Any = bar) -> None:
                    progress.update(bar, completed=done, total=total)

                started = time.perf_counter()
                results[name] = run_task(
                    name,
                    model=gpt,
                    encoding=encoding,
                    max_length=max_length,
                    shards=shards,
                    items=items.get(name),
                    limit=limit,
                    batch_size=batch_size,
                    device=device,
                    alibi_scale=alibi_scale,
                    progress=advance,
                )
                results[name]["seconds"] = round(time.perf_counter() - started, 3)
                # A task that never reported (no requests) still ends as a full bar.
                total = next(t.total for t in progress.tasks if t.id == bar) or 1
                progress.update(bar, total=total, completed=total)
        report = {
            "model": str(source.path),
            "model_format": source.kind,
            "recipe": recipe.name,
            "max_length": max_length,
            "settings": {
                "tasks": names,
                "limit": limit,
                "batch_size": batch_size,
                "device": device,
                "seed": seed,
                "alibi_scale": alibi_scale,
                "data": str(data) if data is not None else None,
                "task_data": str(task_data) if task_data is not None else None,
            },
            "tasks": finite(results),
        }
        console.print(results_table(report["tasks"]))
        write_json_atomic(work / RESULTS, report)
        if LONG_CONTEXT in map(base_task, names):
            from lmpipe.evals.perplexity import write_long_context_png

            if write_long_context_png(work / "long_context.png", report):
                console.print(f"eval: loss by position in {out / 'long_context.png'}")
        write_manifest(
            work,
            "eval",
            inputs={
                "model": report["model"],
                "model_format": source.kind,
                "data": report["settings"]["data"],
                "task_data": report["settings"]["task_data"],
            },
            settings=report["settings"],
            results={
                t: {k: v["value"] for k, v in r.items() if isinstance(v, dict) and "value" in v}
                for t, r in report["tasks"].items()
            },
            files={RESULTS: sha256_file(work / RESULTS)},
        )
    return report


def heldout_split(data: Path) -> TokenShards:
    """The tokenized folder's held-out split; an empty one is an error (nothing to score)."""

    shards = TokenShards(data, "heldout")
    if shards.n_documents == 0:
        raise LmpipeError(f"{data}: the held-out split is empty; tokenize with a larger --holdout")
    return shards


def read_inputs(
    names: list[str],
    *,
    data: Path | None,
    task_data: Path | None,
    limit: int | None,
    seed: int,
    encoding: tiktoken.Encoding,
) -> tuple[TokenShards | None, dict[str, list[Any]]]:
    """The held-out split (None when no task reads it) and the items of every item task
    (`continuation` and the external tasks) by name: each file opened and each row checked
    once, before any task runs."""
    from lmpipe.evals.tasks import EXTERNAL_TASKS, continuation_items, load_items

    heldout = any(base_task(t) in HELDOUT_TASKS for t in names)
    shards = heldout_split(Path(data)) if heldout else None  # type: ignore[arg-type]
    items: dict[str, list[Any]] = {}
    for name in names:
        if name == "continuation":
            # Held-out documents are a hash-chosen sample already: the first ones serve, and a
            # billion-token held-out split is never decoded whole. The distractor pool and the
            # seeded draws depend on this window, so it does not depend on --limit: --limit N
            # takes the first N items of the whole task, as the harness's --limit does.
            window = CONTINUATION_DOCS_PER_ITEM * CONTINUATION_ITEMS
            docs = itertools.islice(shards.documents(), window)  # type: ignore[union-attr]
            texts = [encoding.decode(doc.tolist()) for doc in docs]
            n_items = min(limit or CONTINUATION_ITEMS, CONTINUATION_ITEMS)
            items[name] = continuation_items(texts, seed=seed, limit=n_items)
            if not items[name]:
                raise LmpipeError(
                    f"continuation: none of the {len(texts)} held-out documents is long enough "
                    "(36 words and another document of 20) to make an item"
                )
        elif name in EXTERNAL_TASKS:
            spec = EXTERNAL_TASKS[name]
            items[name] = load_items(spec, task_data, limit)  # type: ignore[arg-type]
            if not items[name]:
                raise LmpipeError(f"{Path(task_data) / spec.path}: no items")  # type: ignore[arg-type]
    return shards, items


def check_continuations(
    items: dict[str, list[Any]],
    encoding: tiktoken.Encoding,
    max_length: int,
    task_data: Path | None,
) -> None:
    """Every request of the item tasks can be scored: a continuation longer than `max_length`
    cannot (the harness would read past its input; `GPTLM` refuses it), and a model trained at a
    short length meets one; nor can a context of only whitespace (an openbookqa stem of spaces,
    a lambada text starting "  Paris"), which leaves no context token (`encode_pair`): the
    harness fails on it with an AssertionError. Checked here, before the first task runs, not
    after hours of scoring the others."""
    from lmpipe.evals.lm import request_lengths
    from lmpipe.evals.tasks import EXTERNAL_TASKS, Choice, Cloze

    for name, task_items in items.items():
        source = (
            f"{Path(task_data) / EXTERNAL_TASKS[name].path}, "  # type: ignore[arg-type]
            if name in EXTERNAL_TASKS
            else ""
        )
        for number, item in enumerate(task_items, 1):
            if isinstance(item, Choice):
                requests = item.requests
            elif isinstance(item, Cloze):
                requests = ((item.context, item.continuation),)
            else:  # rolling texts are cut into windows of the model's length
                continue
            for context, continuation in requests:
                n_context, n = request_lengths(encoding, context, continuation)
                if n_context == 0:
                    raise LmpipeError(
                        f"{name} ({source}item {number}): the context {json.dumps(context)} is "
                        "only whitespace, which leaves no token to predict the continuation from "
                        "(the harness refuses it too); fix or remove the row"
                    )
                if n > max_length:
                    raise LmpipeError(
                        f"{name} ({source}item {number}): a continuation of {n} tokens is longer "
                        f"than the model's max_length ({max_length}, its last stage's seq_len); "
                        "leave the task out of --tasks, or evaluate a model trained longer"
                    )


def run_task(
    name: str,
    *,
    model: torch.nn.Module,
    encoding: tiktoken.Encoding,
    max_length: int,
    shards: TokenShards | None,
    items: list[Any] | None,
    limit: int | None,
    batch_size: int,
    device: str,
    alibi_scale: float,
    progress: Progress | None,
) -> dict[str, Any]:
    """One task's results: the held-out tasks read `shards`, the item tasks score `items` (from
    `read_inputs`)."""
    from lmpipe.evals.lm import GPTLM
    from lmpipe.evals.tasks import EXTERNAL_TASKS, score_items

    lm = GPTLM(
        model,
        encoding,
        max_length,
        batch_size=batch_size,
        alibi_scale=alibi_scale,
        device=device,
        progress=progress,
    )
    # `read_inputs` opened the held-out split for every task that reads it, and read the items of
    # every item task (`continuation` and the external ones).
    if name == "perplexity":
        from lmpipe.evals.perplexity import heldout_perplexity

        assert shards is not None
        return heldout_perplexity(lm, shards, limit=limit)
    if base_task(name) == LONG_CONTEXT:
        from lmpipe.evals.perplexity import loss_by_position

        assert shards is not None
        return loss_by_position(
            model,
            shards,
            long_context_length(name, max_length),
            max_length,
            n_windows=limit or 8,
            base_scale=alibi_scale,
            device=device,
            progress=progress,
        )
    assert items is not None
    if name == "continuation":
        return score_items(lm, items, ("acc", "acc_norm"))
    return score_items(lm, items, EXTERNAL_TASKS[name].metrics)


def finite(obj: Any) -> Any:
    """NaN and infinity as null: results.json stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


def results_table(task_results: dict[str, Any]) -> Table:
    from rich.table import Table

    table = Table(title="lmpipe eval")
    for column, justify in (
        ("task", "left"),
        ("metric", "left"),
        ("value", "right"),
        ("stderr", "right"),
        ("n", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for task, result in task_results.items():
        for key, m in result.items():
            if not (isinstance(m, dict) and "value" in m):
                continue
            value = "-" if m["value"] is None else f"{m['value']:.4f}"
            stderr = "-" if m.get("stderr") is None else f"±{m['stderr']:.4f}"
            table.add_row(task, key, value, stderr, str(result.get("n", "")))
    return table
