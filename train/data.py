"""A run's data: its token folders (one, or a weighted mixture), what each stage reads of each,
and the held-out loss per folder.

`open_sources(recipe)` opens every folder of `recipe.data` (sizes checked; checksums later, when
the ranks can share them) and refuses folders made with different tokenizers, or with ids past
the model's vocabulary. `coverage(plan, loader)` gives, per stage and source, the tokens drawn
and the epochs of that source they make (the plan and the start of a run print it; a stage that
repeats a source more than `recipe.warn_epochs` times is flagged). `heldout_loss` scores the
first tokens of each folder's held-out split, every rank a share of the windows.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.shards import TokenShards
from lmpipe.train.plan import Plan
from lmpipe.train.recipe import DataSource, Recipe, ValidationConfig, validate_recipe

IGNORE = -100  # torch's cross-entropy ignore_index: targets that count for nothing


def with_data(recipe: Recipe, data: Path | list[DataSource] | None) -> Recipe:
    """The recipe with its data: a single folder (source "data"), sources, or the recipe's own
    `data` section when `data` is None; validated again (stage weights name real sources)."""
    if data is None:
        if not recipe.data:
            raise LmpipeError("--data is required: the recipe has no data section")
        return recipe
    sources = [DataSource(name="data", path=Path(data))] if isinstance(data, Path | str) else data
    raw = {**recipe.model_dump(mode="json"), "data": [s.model_dump(mode="json") for s in sources]}
    return validate_recipe(raw, f"recipe {recipe.name} with --data")


def parse_data(values: list[str]) -> Path | list[DataSource] | None:
    """`--data` options: one folder (`tokens/`), or named sources `NAME=PATH[:WEIGHT]` (weight 1
    when left out), repeated; None when none is given."""
    if not values:
        return None
    named = [v for v in values if "=" in v.split("/")[0]]
    if not named:
        if len(values) > 1:
            raise LmpipeError("--data: several folders need names and weights: --data NAME=PATH:WEIGHT")  # fmt: skip
        return Path(values[0])
    if len(named) != len(values):
        raise LmpipeError("--data: give one folder, or every source as NAME=PATH:WEIGHT")
    sources = []
    for value in values:
        name, _, rest = value.partition("=")
        path, sep, weight = rest.rpartition(":")
        if not sep or "/" in weight:
            path, weight = rest, "1"
        try:
            sources.append(DataSource(name=name, path=Path(path), weight=float(weight)))
        except ValueError as e:  # pydantic's, or float()'s
            why = e.errors()[0]["msg"] if hasattr(e, "errors") else str(e)
            raise LmpipeError(f"--data {value}: {why}") from None
    return sources


def open_sources(recipe: Recipe) -> dict[str, TokenShards]:
    """Every source's training split, checked against the others and the model."""
    assert recipe.data  # with_data first
    sources = {
        s.name: TokenShards(s.path, "train", verify=False, mixture=True) for s in recipe.data
    }
    for source in recipe.data:
        if sources[source.name].n_tokens < 2:
            raise LmpipeError(
                f"{source.path}: its training split holds {sources[source.name].n_tokens} "
                f"token(s), too few to train on (source {source.name!r})"
            )
    first_name, first = next(iter(sources.items()))
    fingerprint = first.manifest["tokenizer"]["ranks_sha256"]
    for source, shards in zip(recipe.data, sources.values(), strict=True):
        if shards.manifest["tokenizer"]["ranks_sha256"] != fingerprint:
            raise LmpipeError(
                f"{source.path}: made with tokenizer {shards.manifest['tokenizer']['name']!r} "
                f"(ranks sha256 {shards.manifest['tokenizer']['ranks_sha256'][:12]}...), not the "
                f"one of source {first_name!r}; every source of a mixture needs the same tokenizer"
            )
        if shards.vocab_size > recipe.model.vocab_size:
            raise LmpipeError(
                f"{source.path}: token ids up to {shards.vocab_size} exceed model.vocab_size "
                f"{recipe.model.vocab_size}"
            )
    return sources


def coverage(recipe: Recipe, plan: Plan, loader: Any) -> list[dict[str, Any]]:
    """Per stage and source: tokens drawn, tokens in one epoch of the source at the stage's
    window length (a window of seq_len inputs consumes seq_len tokens), and the epochs drawn."""
    rows = []
    paths = {s.name: s.path for s in recipe.data or []}
    for stage in plan.stages:
        for source in stage.sources:
            epoch_tokens = loader.epoch_windows(source.name, stage.seq_len) * stage.seq_len
            if not epoch_tokens:
                raise LmpipeError(
                    f"{paths.get(source.name)}: source {source.name!r} holds fewer tokens than one "
                    f"window of stage {stage.index} ({stage.seq_len:,} + 1)"
                )
            drawn = source.windows * stage.seq_len
            rows.append(
                {
                    "stage": stage.index,
                    "seq_len": stage.seq_len,
                    "source": source.name,
                    "tokens": drawn,
                    "epoch_tokens": epoch_tokens,
                    "epochs": drawn / epoch_tokens,
                    "repeats": drawn / epoch_tokens > recipe.warn_epochs,
                }
            )
    return rows


def print_coverage(recipe: Recipe, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console

    console = Console(stderr=True)
    paths = {s.name: s.path for s in recipe.data or []}
    for r in rows:
        console.print(
            f"data {r['source']} ({paths.get(r['source'])}): stage {r['stage']} reads "
            f"{r['tokens']:,} tokens, {r['epochs']:.2f} epochs of {r['epoch_tokens']:,} at "
            f"{r['seq_len']:,}",
            highlight=False,
        )
        if not r["tokens"]:
            console.print(
                f"[yellow]warning:[/] stage {r['stage']} draws nothing of source {r['source']}: "
                "its share of the stage's windows is less than half a window",
                highlight=False,
            )
        if r["repeats"]:
            console.print(
                f"[yellow]warning:[/] stage {r['stage']} repeats source {r['source']} "
                f"{r['epochs']:.1f} times (more than warn_epochs = {recipe.warn_epochs:g}); "
                "its weight upsamples it",
                highlight=False,
            )


def data_identity(sources: dict[str, TokenShards]) -> dict[str, str]:
    """Each source's training tokens, named by a digest of its shards' sha256s and counts (the
    manifest's): the same under any folder path, another for other tokens. A checkpoint keeps
    them, and a resume must read the same (`run_folder.check_run_dir`)."""
    out = {}
    for name, shards in sources.items():
        listing = [(s["bin_sha256"], s["idx_sha256"], s["n_tokens"]) for s in shards.shards]
        out[name] = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
    return out


def open_heldout(
    recipe: Recipe, required: bool = False, warn: bool = True
) -> dict[str, TokenShards]:
    """The held-out split of every source that has one: every source's when `required` (the
    recipe's `validation` section asks for them), and an empty one is then an error. A split
    shorter than one window of a stage has no loss in that stage; with `warn` (rank 0) that is
    said at the start, not left to an empty `val_loss`."""
    assert recipe.data
    out = {}
    for source in recipe.data:
        shards = TokenShards(source.path, "heldout", verify=False)
        if shards.n_tokens <= 1:
            if required:
                raise LmpipeError(
                    f"{source.path}: its held-out split has {shards.n_tokens} tokens, and the "
                    f"recipe's validation scores every source's (tokenize it with --holdout, or "
                    "leave `validation` out: sources without one are then not scored)"
                )
            continue
        out[source.name] = shards
        short = [i for i, s in enumerate(recipe.stages) if shards.n_tokens < s.seq_len + 1]
        if short and warn:
            from rich.console import Console

            Console(stderr=True).print(
                f"[yellow]warning:[/] source {source.name} ({source.path}): its held-out split "
                f"has {shards.n_tokens:,} tokens, fewer than one window of stage "
                f"{', '.join(str(i) for i in short)} (seq_len + 1 = "
                f"{recipe.stages[short[0]].seq_len + 1:,}): no held-out loss there",
                highlight=False,
            )
    return out


def heldout_splits(recipe: Recipe, sources: dict[str, Any]) -> dict[str, Any]:
    """The held-out splits to score: every source's when the recipe asks for validation (a
    source without one is an error), otherwise those of the sources that have one."""
    first_rank = int(os.environ.get("RANK", "0")) == 0  # one warning, not one a rank
    if recipe.validation:
        return open_heldout(recipe, required=True, warn=first_rank)
    having = [s for s in recipe.data or [] if "heldout" in sources[s.name].manifest["splits"]]
    if not having:
        return {}
    return open_heldout(recipe.model_copy(update={"data": having}), warn=first_rank)


def validation_of(recipe: Recipe, plan: Plan) -> ValidationConfig:
    """The recipe's validation, or the default: every tenth of the run's tokens, the first 16
    windows' worth of the longest stage's length of each held-out split (a few forward passes
    of the micro-batch, against a tenth of the run's steps)."""
    if recipe.validation:
        return recipe.validation
    longest = max(stage.seq_len for stage in plan.stages)
    return ValidationConfig(every_tokens=max(plan.total_tokens // 10, 1), tokens=16 * longest)


def heldout_loss(
    engine: Any,
    heldout: dict[str, TokenShards],
    *,
    seq_len: int,
    tokens: int,
    micro_batch: int,
    alibi_scale: float,
    rank: int,
    world: int,
) -> dict[str, float]:
    """Token-mean loss of the first `tokens` tokens of each held-out split (whole windows of
    `seq_len`, the same windows at every validation and at any world size), the windows shared
    among the ranks. A split shorter than one window has no loss."""
    import torch
    import torch.distributed as dist

    device = engine.device
    names = sorted(heldout)
    sums = torch.zeros(2 * len(names), dtype=torch.float64, device=device)
    was_training = engine.module.training
    engine.module.eval()
    with torch.no_grad():
        for k, name in enumerate(names):
            shards = heldout[name]
            n_windows = min(tokens, shards.n_tokens - 1) // seq_len
            mine = np.arange(rank, n_windows, world)
            # Every rank runs as many forwards (ZeRO-3 gathers weights in each, on every rank),
            # so a rank short of windows pads with window 0 whose targets are all ignored: every
            # window is scored once, at any world size.
            per_rank = -(-n_windows // world)
            padded = np.concatenate([mine, np.zeros(per_rank - len(mine), dtype=np.int64)])
            for start in range(0, per_rank, micro_batch):
                rows = padded[start : start + micro_batch]
                real = np.arange(start, start + len(rows)) < len(mine)
                batch = np.stack(
                    [shards.tokens(w * seq_len, w * seq_len + seq_len + 1) for w in rows]
                )
                batch_BT1 = torch.from_numpy(batch.astype(np.int64)).to(device)
                targets = batch_BT1[:, 1:].clone()
                targets[torch.from_numpy(~real).to(device)] = IGNORE  # cross-entropy skips these
                _, loss = engine(batch_BT1[:, :-1], targets, alibi_scale=alibi_scale)
                count = int(real.sum()) * seq_len
                if count:
                    sums[2 * k] += loss.double() * count
                    sums[2 * k + 1] += count
    engine.module.train(was_training)
    dist.all_reduce(sums)
    return {  # a split shorter than one window has no loss
        name: round(float(sums[2 * k] / sums[2 * k + 1]), 6)
        for k, name in enumerate(names)
        if sums[2 * k + 1]
    }


def print_data_plan(recipe: Recipe, plan: Plan) -> None:
    """What each stage draws from each source: weight, tokens and, when the folders can be
    read, the epochs of each source that makes (`--dry-run`)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from lmpipe.dataprep.mixture import MixtureLoader
    from lmpipe.dataprep.report import print_table

    rows = None
    if recipe.data:
        try:
            rows = coverage(recipe, plan, MixtureLoader(open_sources(recipe), recipe.seed))
        except LmpipeError as e:
            Console(stderr=True).print(f"data: epochs unknown ({e})", markup=False)
    table = Table(title="data drawn per stage and source", box=box.SIMPLE_HEAD)
    for col in ("stage", "source", "weight", "tokens", "epochs"):
        table.add_column(col, justify="left" if col == "source" else "right", no_wrap=True)
    epochs = {(r["stage"], r["source"]): r["epochs"] for r in rows or []}
    for stage in plan.stages:
        total = sum(s.windows for s in stage.sources) or 1
        for source in stage.sources:
            drawn = epochs.get((stage.index, source.name))
            table.add_row(
                str(stage.index), source.name, f"{source.windows / total:.3f}",
                f"{source.windows * stage.seq_len:,}", "-" if drawn is None else f"{drawn:.2f}",
            )  # fmt: skip
    print_table(Console(), table)
    if rows:
        print_coverage(recipe, [r for r in rows if r["repeats"] or not r["tokens"]])
