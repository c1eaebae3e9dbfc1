"""`lmpipe mup coord-check`: muP's coordinate check, the test that a parametrisation transfers.

A recipe's model is built at several widths (d_model; the head size, the FFN ratio, the depth and
every muP base shape kept, so the widths differ only in muP's width multiplier m_d), each trained
a few AdamW steps at the recipe's base rate on the same batches, and the mean absolute value of
each activation is recorded at every step: the embedding output (times alpha_in), each block's
attention and MLP outputs, the final hidden state (the residual stream into ln_f) and the logits.
Under muP these stay the same size as the width grows (log-log slope against width about 0); under
the standard parametrisation (`param="sp"`: the same model with every muP multiplier 1 and the
init std sigma_base) the hidden states grow with it (Tensor Programs V, Figure 5; Cerebras-GPT,
seeds-spec 3.3).

    coord_check(CoordCheck(recipe, widths=(128, 256, 512, 1024)), out)

writes `out/coord.json` (per parametrisation, quantity, width and step the mean |x|, and per
quantity the slope at the last step), `out/coord.png` (one panel per quantity, activation scale
against width, one line per step; with matplotlib) and `manifest.json`, and prints the slopes.
Batches are windows of a token folder's training split (`data`) or seeded uniform random tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.figures import LITERAL, draw_picture
from lmpipe.dataprep.folders import staged_output, write_json_atomic, write_manifest
from lmpipe.train.recipe import ModelConfig, Recipe, recipe_yaml

JSON, PNG = "coord.json", "coord.png"
PARAMS = ("mup", "mup-uncorrected", "sp")  # as a sweep's --param


@dataclass(frozen=True)
class CoordCheck:
    """What a coordinate check measures. `seq_len`: the windows' length (default: the recipe's
    first stage, at most 256, so a check stays cheap); `lr`: the base rate eta_base, constant
    (muP's promise is about a rate, not a schedule); default a tenth of the recipe's, about what
    its warmup reaches in the first steps (BTLM: 1.2e-3 at step 10 of 95). At the full peak rate
    without warmup, ten steps on random data diverge at every width."""

    recipe: Recipe
    widths: tuple[int, ...]
    steps: int = 10
    params: tuple[str, ...] = ("mup",)
    data: Path | None = None
    batch_size: int = 8
    seq_len: int | None = None
    lr: float | None = None
    seed: int = 0
    recipe_file: Path | None = None  # the recipe's file, if it came from one: read, never touched

    @property
    def widths_sorted(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.widths)))

    @property
    def window(self) -> int:
        return self.seq_len or min(self.recipe.stages[0].seq_len, 256)

    @property
    def rate(self) -> float:
        return self.lr if self.lr is not None else self.recipe.optimizer.lr / 10


def check_settings(check: CoordCheck) -> None:
    """Every problem with the settings as one line, before any model is built."""
    model = check.recipe.model
    if len(check.widths_sorted) < 2:
        raise LmpipeError("--widths: a coordinate check needs at least two widths")
    seq_len_bad = check.seq_len is not None and check.seq_len < 1
    if check.steps < 1 or check.batch_size < 1 or seq_len_bad or check.rate <= 0:
        raise LmpipeError("--steps, --batch-size, --seq-len and --lr must be positive")
    unknown = [p for p in check.params if p not in PARAMS]
    if unknown or not check.params:
        raise LmpipeError(f"--param: {', '.join(PARAMS)} (got {', '.join(unknown) or 'none'})")
    if any(p.startswith("mup") for p in check.params) and model.mup is None:
        raise LmpipeError(
            f"recipe {check.recipe.name} has no muP base shapes (model.mup is null: it is the "
            "standard parametrisation); check it with --param sp, or give a muP recipe"
        )
    for w in check.widths_sorted:
        if w < 1 or w % model.d_head:
            raise LmpipeError(
                f"--widths: {w} is not a multiple of the head size {model.d_head} "
                "(d_model / n_heads of the recipe)"
            )
    if model.position == "learned" and check.window > model.n_positions:
        raise LmpipeError(f"--seq-len {check.window} exceeds model.n_positions {model.n_positions}")


def width_config(model: ModelConfig, width: int, param: str) -> ModelConfig:
    """The recipe's model at `width`: heads of the same size, the same FFN ratio, muP's base
    shapes kept (so m_d = width / d_model_base), or SP (every multiplier 1, init std sigma_base);
    mup-uncorrected: muP without SμPar's density correction, as a sweep's."""
    d_ff = max(1, round(width * model.d_ff / model.d_model))
    update: dict[str, Any] = {"d_model": width, "n_heads": width // model.d_head, "d_ff": d_ff}
    if param == "sp":
        std = model.mup.sigma_base if model.mup else model.init_std
        update.update(mup=None, init_std=std)
    if param == "mup-uncorrected" and model.mup:  # dense muP's rules on a sparse model (SμPar off)
        update["mup"] = {**model.mup.model_dump(), "sparse_correction": False}
    try:
        return ModelConfig.model_validate({**model.model_dump(), **update})
    except ValueError as e:
        raise LmpipeError(f"width {width}: {e}") from None


def batches(check: CoordCheck, vocab: int) -> list[np.ndarray]:
    """The same `steps` batches of [batch_size, seq_len + 1] tokens for every width."""
    shape = (check.batch_size, check.window + 1)
    if check.data is None:
        rng = np.random.default_rng(check.seed)
        return [rng.integers(0, vocab, shape, dtype=np.int64) for _ in range(check.steps)]
    from lmpipe.dataprep.loader import WindowLoader
    from lmpipe.dataprep.shards import TokenShards

    shards = TokenShards(check.data, "train", verify=False)
    if shards.vocab_size > vocab:
        raise LmpipeError(f"{check.data}: token ids up to {shards.vocab_size} exceed the model's {vocab}")  # fmt: skip
    loader = WindowLoader(shards, check.seed)
    stream = loader.batches(
        seq_len=check.window,
        global_batch=check.batch_size,
        region_start=0,
        n_batches=check.steps,
    )
    return list(stream)


def measure(check: CoordCheck, param: str, width: int, data: list[np.ndarray]) -> dict[str, list[float]]:  # fmt: skip
    """Train one width for `steps` steps; per quantity the mean |x| of each step's forward."""
    import torch

    from lmpipe.train.model import GPT, Block

    cfg = width_config(check.recipe.model, width, param)
    torch.manual_seed(check.seed)
    # The plain loss: the check records the logits, which the chunked loss never forms.
    model = GPT(cfg.model_copy(update={"attn_impl": "sdpa", "loss_impl": "plain"}))
    opt = check.recipe.optimizer
    optimizer = torch.optim.AdamW(
        model.param_groups(check.rate, opt.weight_decay),
        lr=check.rate,
        betas=opt.betas,
        eps=opt.eps,
    )
    coords: dict[str, list[float]] = {}

    def record(name: str, x: torch.Tensor) -> None:
        coords.setdefault(name, []).append(x.detach().abs().mean().item())

    hooks = [model.h[0].register_forward_pre_hook(lambda m, args: record("embedding", args[0]))]
    for i, block in enumerate(cast(list[Block], model.h)):  # nn.ModuleList is not generic
        hooks.append(block.attn.register_forward_hook(lambda m, a, y, i=i: record(f"attn.{i}", y)))
        hooks.append(block.mlp.register_forward_hook(lambda m, a, y, i=i: record(f"mlp.{i}", y)))
    hooks.append(model.ln_f.register_forward_pre_hook(lambda m, args: record("hidden", args[0])))
    model.train()
    for batch in data:
        tokens = torch.from_numpy(batch)
        logits, loss = model(tokens[:, :-1], tokens[:, 1:])
        record("logits", logits)
        if not math.isfinite(loss.item()):
            raise LmpipeError(f"{param} width {width}: the loss is {loss.item()} (lower --lr)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for hook in hooks:
        hook.remove()
    return coords


def slope(widths: tuple[int, ...], values: list[float]) -> float:
    """The least-squares slope of log(value) against log(width)."""
    return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


def coord_check(check: CoordCheck, out: Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Run the check, write coord.json, coord.png and the manifest into `out`; the results."""
    from rich.console import Console

    check_settings(check)
    data = batches(check, check.recipe.model.vocab_size)
    results: dict[str, Any] = {}
    console = Console(stderr=True)
    with staged_output(
        Path(out), stage="coord-check", reads=[check.data, check.recipe_file], overwrite=overwrite
    ) as work:
        for param in check.params:
            per_width = {}
            for width in check.widths_sorted:
                console.print(f"coord-check: {param} width {width}", highlight=False)
                per_width[width] = measure(check, param, width, data)
            quantities = list(per_width[check.widths_sorted[0]])
            coords = {q: {str(w): per_width[w][q] for w in check.widths_sorted} for q in quantities}
            slopes = {
                q: slope(check.widths_sorted, [per_width[w][q][-1] for w in check.widths_sorted])
                for q in quantities
            }
            results[param] = {"coords": coords, "slopes": slopes}
        report = {
            "recipe": check.recipe.name,
            "widths": list(check.widths_sorted),
            "steps": check.steps,
            "batch_size": check.batch_size,
            "seq_len": check.window,
            "lr": check.rate,
            "seed": check.seed,
            "data": str(check.data) if check.data else None,
            "model": check.recipe.model.model_dump(mode="json"),
            "params": results,
        }
        write_json_atomic(work / JSON, report)
        plotted = write_coord_png(report, work / PNG)
        (work / "recipe.yaml").write_text(recipe_yaml(check.recipe), encoding="utf-8")
        write_manifest(
            work, "coord-check", settings={k: v for k, v in report.items() if k != "params"},
            slopes={p: r["slopes"] for p, r in results.items()}, files=[JSON, *([PNG] if plotted else [])],
        )  # fmt: skip
    print_slopes(report)
    return report


def print_slopes(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from lmpipe.dataprep.report import print_table

    params = list(report["params"])
    table = Table(title=f"coord-check: log-log slope of mean |x| against width, step {report['steps']}")  # fmt: skip
    table.add_column("quantity")
    for p in params:
        table.add_column(p, justify="right")
    for q in report["params"][params[0]]["slopes"]:
        table.add_row(q, *(f"{report['params'][p]['slopes'][q]:+.3f}" for p in params))
    print_table(Console(), table)


def write_coord_png(report: dict[str, Any], path: Path) -> bool:
    """One panel per quantity (a row of panels per parametrisation): mean |x| against width,
    log-log, one line per step (dark: step 1, light: the last step). False (and no file) without
    matplotlib or when drawing fails, one line on stderr saying which."""
    return draw_picture(path, lambda png: _draw_coord_png(report, png))


def log_ticks(lo: float, hi: float) -> list[float]:
    """The 1-2-5 values in [lo, hi]: at least two in a span of a decade, as plain numbers."""
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    steps = [m * 10.0**e for e in range(first, last + 1) for m in (1, 2, 5)]
    return [v for v in steps if lo <= v <= hi]


def _draw_coord_png(report: dict[str, Any], path: Path) -> None:
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    params = list(report["params"])
    quantities = list(report["params"][params[0]]["coords"])
    cols = min(6, len(quantities))
    rows_per = math.ceil(len(quantities) / cols)
    fig = Figure(figsize=(2.6 * cols, 2.5 * rows_per * len(params)), dpi=100)
    widths = report["widths"]
    cmap = colormaps["viridis"]
    for r, param in enumerate(params):
        coords = report["params"][param]["coords"]
        for k, q in enumerate(quantities):
            ax = fig.add_subplot(rows_per * len(params), cols, r * rows_per * cols + k + 1)
            values = np.array([coords[q][str(w)] for w in widths])  # [widths, steps]
            for t in range(values.shape[1]):
                ax.plot(widths, values[:, t], color=cmap(t / max(values.shape[1] - 1, 1)), lw=1)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            # At least a decade of y: a flat line looks flat, not zoomed into its noise.
            lo, hi = float(values.min()), float(values.max())
            mid, span = math.sqrt(lo * hi), max(hi / lo, 10.0)
            bottom, top = mid / math.sqrt(span), mid * math.sqrt(span)
            ax.set_ylim(bottom, top)
            ax.set_xticks(widths, [str(w) for w in widths])
            ax.minorticks_off()
            # Labelled ticks inside the panel's range (a decade's only power of ten may lie
            # outside it), so the sizes can be read off.
            ticks = log_ticks(bottom, top)
            ax.set_yticks(ticks, [f"{v:g}" for v in ticks])
            slope_q = report["params"][param]["slopes"][q]
            ax.set_title(f"{param}: {q} (slope {slope_q:+.2f})", fontsize=8)
            ax.set_xlabel("d_model", fontsize=6, labelpad=1)
            if k % cols == 0:
                ax.set_ylabel("mean |x|", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.suptitle(
        f"lmpipe mup coord-check {report['recipe']}: mean |x| against d_model, one line per step "
        f"(dark: step 1, light: step {report['steps']})",
        **LITERAL,
    )
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
