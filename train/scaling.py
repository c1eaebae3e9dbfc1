"""`lmpipe scaling`: the compute scaling law of finished runs, and compute-optimal recipe families.

Fit (Cerebras-GPT, seeds-spec 3.4, Eq. 1): L(f) = (f / a)^b + c, f the training FLOPs (the
recipe's FLOPs per token, 6 N + 12 L T d, times the tokens it trained: `plan.training_flops`), L
the held-out loss of the run's last validation (mean over its sources), or with `loss="train"`
the mean training loss of its last tenth of steps. No scipy: the fit takes, for each c on a grid
in [0, lowest loss), the least-squares line through (ln f, ln(L - c)), keeps the c with the
least squared error in L, and refines (ln a, b, c) by Levenberg-Marquardt on the squared error
in L, c kept in that range (an irreducible loss: a negative one would fit noise, not a law; at
a bound only a and b move); losses that do not change with compute have no law (a would be 0
or infinite) and are refused. The uncertainty is a bootstrap over runs (runs drawn with
replacement, refitted; draws with fewer than three distinct compute budgets, or flat, skipped):
the standard deviation and the 16th and 84th percentiles of each parameter. Written: fit.json,
fit.png (loss against FLOPs, log-log: the runs, the fit and, with `published`, Cerebras-GPT's
fit and its models) and manifest.json.

Family (`family`): from a base recipe, one recipe per size, trained on `tokens_per_param` tokens
a parameter (Chinchilla's 20, as Cerebras-GPT did; seeds-spec 3.2). A size is a width (`768`:
d_model) or a parameter count with a suffix (`111M`, `1.3B`: the width whose model comes
closest). Depth follows the base's aspect ratio d_model / n_layers, heads keep the base's size,
d_ff its ratio, muP's base shapes stay (the base values transfer); stages keep their shares of
the tokens and the warmup its fraction; the batch (tokens per step) stays the base's. Parameters are counted
whole (`count="total"`, as Chinchilla and Cerebras-GPT count them) or without the embeddings
(`"non-embedding"`, Kaplan et al.'s N): for tiny models with GPT-2's 50,257-token vocabulary the
embedding is nearly all of the model, and 20 tokens per non-embedding parameter is what a CPU
can train.
"""

from __future__ import annotations

import math
import re
import reprlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.figures import draw_picture
from lmpipe.dataprep.folders import (
    MANIFEST,
    is_int,
    read_manifest,
    staged_output,
    write_json_atomic,
    write_manifest,
)
from lmpipe.train.metrics import number, val_losses
from lmpipe.train.recipe import ModelConfig, Recipe, load_recipe, recipe_file, recipe_yaml
from lmpipe.train.run_folder import metrics_rows
from lmpipe.train.sweep_plan import heads_for

FIT_JSON, FIT_PNG, FAMILY_JSON = "fit.json", "fit.png", "family.json"


@dataclass(frozen=True)
class PowerLaw:
    """L(f) = (f / a)^b + c, and the root-mean-square error of the fit."""

    a: float
    b: float
    c: float
    rmse: float = 0.0

    def __call__(self, flops: Any) -> Any:
        return (np.asarray(flops, dtype=float) / self.a) ** self.b + self.c

    @property
    def flat(self) -> bool:
        """No trend with compute (losses that do not change): (f / a)^b is then a constant, and
        `a` is 0, infinite or has no JSON number."""
        return not (math.isfinite(self.a) and self.a > 0 and self.b != 0)


@dataclass(frozen=True)
class Published:
    """A published fit and the models it was fitted on (FLOPs and loss as the source prints)."""

    law: PowerLaw
    models: tuple[tuple[str, float, float], ...]  # (name, training FLOPs, test loss)
    source: str


# Cerebras-GPT, seeds-spec 3.4 (Eq. 1) and 3.1 (the model card: FLOPs, Pile test cross-entropy).
PUBLISHED = {
    "cerebras-gpt": Published(
        PowerLaw(a=5.984e22, b=-0.0737, c=0.5066),
        (
            ("111M", 2.6e18, 2.566),
            ("256M", 1.3e19, 2.299),
            ("590M", 6.1e19, 2.184),
            ("1.3B", 2.8e20, 1.996),
            ("2.7B", 1.1e21, 1.834),
            ("6.7B", 6.3e21, 1.704),
            ("13B", 2.3e22, 1.575),
        ),  # fmt: skip
        "Cerebras-GPT (arXiv 2304.03208) Eq. 1, Pile test loss; models from its card",
    )
}


@dataclass(frozen=True)
class RunPoint:
    """What the fit takes from one finished run."""

    run: str
    parameters: int
    tokens: int
    flops: float
    loss: float


# --- reading runs ----------------------------------------------------------------------------


def read_run(run_dir: Path, loss: str = "heldout") -> RunPoint:
    """Parameters, tokens, training FLOPs and loss of a finished run folder."""
    from lmpipe.train.plan import make_plan, training_flops

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir, "train")
    recipe = load_recipe(str(run_dir / "recipe.yaml"))
    plan = make_plan(recipe)
    summary = manifest.get("summary", {})
    if not isinstance(summary, dict):
        raise LmpipeError(f"{run_dir / MANIFEST}: 'summary' is not a JSON object")
    tokens = summary.get("tokens") or plan.total_tokens  # none recorded: the recipe's
    if not is_int(tokens) or tokens < 0:
        raise LmpipeError(
            f"{run_dir / MANIFEST}: 'summary.tokens' is {reprlib.repr(tokens)}, not a whole "
            "number of tokens"
        )
    rows = metrics_rows(run_dir)
    if loss == "heldout":
        scored = [v for r in rows if (v := val_losses(r, str(run_dir / "metrics.jsonl")))]
        if not scored:
            raise LmpipeError(
                f"{run_dir}: no held-out loss in metrics.jsonl (train with a validation section, "
                "or fit the training loss with --loss train)"
            )
        value = float(np.mean(list(scored[-1].values())))
    elif loss == "train":
        losses = [x for r in rows if (x := number(r.get("loss"))) is not None]
        if not losses:
            raise LmpipeError(f"{run_dir}: no training loss in metrics.jsonl")
        value = float(np.mean(losses[-max(1, len(losses) // 10) :]))
    else:
        raise LmpipeError(f"--loss {loss!r}: heldout or train")
    if not math.isfinite(value):
        raise LmpipeError(f"{run_dir}: its {loss} loss is {value} (the run diverged)")
    return RunPoint(str(run_dir), plan.n_params, tokens, training_flops(recipe, plan), value)


# --- the fit ---------------------------------------------------------------------------------


def fit_power_law(flops: Any, loss: Any, iterations: int = 200) -> PowerLaw:
    """Least-squares fit of L(f) = (f / a)^b + c (in L), by a grid over c and Levenberg-Marquardt."""
    x, y = np.log(np.asarray(flops, dtype=float)), np.asarray(loss, dtype=float)
    if len(np.unique(x)) < 3:
        raise LmpipeError(
            f"scaling: a fit of L(f) = (f/a)^b + c needs runs of at least 3 different compute "
            f"budgets (got {len(np.unique(x))})"
        )
    if y.min() <= 0:
        raise LmpipeError("scaling: every loss must be positive")
    x0 = x.mean()
    u = x - x0  # centred: the line's intercept and slope are then uncorrelated
    # Every c below the lowest loss: evenly spaced, and ever closer to it (a flat law).
    lo = y.min()
    cs = np.concatenate([np.linspace(0, lo, 200, endpoint=False), lo * (1 - np.logspace(-8, -1, 60))])  # fmt: skip
    z = np.log(y[None, :] - cs[:, None])  # [C, n]
    slope = (z * u).sum(1) / (u * u).sum()
    icept = z.mean(1)
    sse = ((cs[:, None] + np.exp(icept[:, None] + slope[:, None] * u) - y) ** 2).sum(1)
    best = int(np.argmin(sse))
    theta = np.array([icept[best], slope[best], cs[best]])  # L = c + exp(k + b u)

    def residual(t: np.ndarray) -> np.ndarray:
        return y - (t[2] + np.exp(t[0] + t[1] * u))

    r = residual(theta)
    c_max = lo * (1 - 1e-12)  # an irreducible loss: at least 0, below every loss seen
    damping = 1e-3
    for _ in range(iterations):
        e = np.exp(theta[0] + theta[1] * u)
        jac = np.stack([e, u * e, np.ones_like(u)], axis=1)  # d prediction / d (k, b, c)
        step = _lm_step(jac, r, damping)
        if not 0 <= theta[2] + step[2] <= c_max:  # c at its bound: move k and b alone
            step = np.append(_lm_step(jac[:, :2], r, damping), 0.0)
        trial = theta + step
        r_trial = residual(trial)
        if np.isfinite(r_trial).all() and (r_trial @ r_trial) <= (r @ r):
            small = abs(r @ r - r_trial @ r_trial) <= 1e-15 * max(r @ r, 1e-300)
            theta, r, damping = trial, r_trial, max(damping / 3, 1e-12)
            if small or np.abs(step).max() < 1e-12:
                break
        else:
            damping *= 4
            if damping > 1e12:
                break
    k, b, c = theta
    # k + b u = b ln f - b ln a, so ln a = x0 - k / b.
    log_a = x0 - k / b if b != 0 else math.inf
    a = math.exp(log_a) if log_a < 700 else math.inf
    return PowerLaw(a=a, b=float(b), c=float(c), rmse=float(np.sqrt((r @ r) / len(y))))


def _lm_step(jac: np.ndarray, r: np.ndarray, damping: float) -> np.ndarray:
    """Levenberg-Marquardt's step: (J^T J + damping diag(J^T J)) step = J^T r."""
    a_mat = jac.T @ jac
    return np.linalg.lstsq(a_mat + damping * np.diag(np.diag(a_mat) + 1e-12), jac.T @ r, rcond=None)[0]  # fmt: skip


def bootstrap(flops: Any, loss: Any, samples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The fit's spread over runs drawn with replacement: per parameter the standard deviation
    and 16th / 84th percentiles (a in log space: its std is that of ln a)."""
    flops, loss = np.asarray(flops, dtype=float), np.asarray(loss, dtype=float)
    rng = np.random.default_rng(seed)
    fits = []
    for _ in range(samples):
        pick = rng.integers(0, len(flops), len(flops))
        if len(np.unique(flops[pick])) < 3:
            continue
        law = fit_power_law(flops[pick], loss[pick])
        if not law.flat:
            fits.append((math.log(law.a), law.b, law.c))
    out: dict[str, Any] = {"samples": samples, "used": len(fits)}
    if len(fits) < 2:
        return out
    arr = np.array(fits)
    for i, name in enumerate(("a", "b", "c")):
        col = arr[:, i]
        p16, p84 = np.percentile(col, [16, 84])
        if name == "a":
            out[name] = {"log_std": float(col.std(ddof=1)), "p16": math.exp(p16), "p84": math.exp(p84)}  # fmt: skip
        else:
            out[name] = {"std": float(col.std(ddof=1)), "p16": float(p16), "p84": float(p84)}
    return out


def scaling(
    run_dirs: list[Path],
    out: Path,
    *,
    published: str | None = None,
    loss: str = "heldout",
    samples: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Fit the finished runs' loss against their training FLOPs; write fit.json, fit.png and
    the manifest into `out`; returns fit.json's content."""
    if published is not None and published not in PUBLISHED:
        raise LmpipeError(f"--published {published!r}: one of {', '.join(PUBLISHED)}")
    if samples < 0:
        raise LmpipeError(f"--bootstrap {samples}: the number of draws is 0 (none) or more")
    paths = [Path(p) for p in run_dirs]
    if len({p.resolve() for p in paths}) != len(paths):
        raise LmpipeError("scaling: a run folder is given twice")
    if len(paths) < 3:
        raise LmpipeError(
            f"scaling: a fit of L(f) = (f/a)^b + c has 3 parameters and needs at least 3 runs (got {len(paths)})"
        )
    runs = [read_run(p, loss) for p in paths]
    flops = [r.flops for r in runs]
    losses = [r.loss for r in runs]
    law = fit_power_law(flops, losses)
    if law.flat:
        raise LmpipeError(
            f"scaling: the loss does not change with compute across these runs (fit: a = "
            f"{law.a:.4g}, b = {law.b:.3g}), so there is no power law to fit; check that the runs "
            "differ (equal losses: the same run, or runs that did not train)"
        )
    spread = bootstrap(flops, losses, samples, seed)
    report: dict[str, Any] = {
        "law": "L(f) = (f / a)^b + c",
        "loss": loss,
        "runs": [asdict(r) for r in runs],
        "fit": asdict(law),
        "bootstrap": spread,
        "published": None,
    }
    if published is not None:
        p = PUBLISHED[published]
        report["published"] = {"name": published, "fit": asdict(p.law), "source": p.source,
                               "models": [list(m) for m in p.models]}  # fmt: skip
    with staged_output(Path(out), stage="scaling", reads=paths, overwrite=overwrite) as work:
        write_json_atomic(work / FIT_JSON, report)
        write_fit_png(work / FIT_PNG, report)
        write_manifest(
            work,
            "scaling",
            loss=loss,
            runs=[r.run for r in runs],
            fit=asdict(law),
            bootstrap=spread,
        )
    print_fit(report)
    return report


def print_fit(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from lmpipe.dataprep.report import print_table

    console = Console()
    table = Table(title=f"runs ({report['loss']} loss)")
    for col in ("run", "parameters", "tokens", "FLOPs", "loss", "fit"):
        table.add_column(col, justify="left" if col == "run" else "right", no_wrap=True)
    law = PowerLaw(**report["fit"])
    for r in report["runs"]:
        table.add_row(
            r["run"],
            f"{r['parameters']:,}",
            f"{r['tokens']:,}",
            f"{r['flops']:.3g}",
            f"{r['loss']:.4f}",
            f"{float(law(r['flops'])):.4f}",
        )
    print_table(console, table)
    s = report["bootstrap"]
    a_band = f" (68%: {s['a']['p16']:.3g} .. {s['a']['p84']:.3g})" if "a" in s else ""
    b_band = f" +- {s['b']['std']:.3g}" if "b" in s else ""
    c_band = f" +- {s['c']['std']:.3g}" if "c" in s else ""
    console.print(
        f"L(f) = (f / a)^b + c: a = {law.a:.4g}{a_band}, b = {law.b:.4g}{b_band}, "
        f"c = {law.c:.4g}{c_band}; rmse {law.rmse:.3g}; bootstrap {s['used']} of {s['samples']} "
        "draws over runs",
        highlight=False,
    )
    if law.b >= 0:
        console.print(
            "warning: the fitted loss does not fall with compute (b >= 0): check the runs",
            highlight=False,
        )
    if report["published"]:
        p = report["published"]["fit"]
        console.print(
            f"{report['published']['name']}: a = {p['a']:.4g}, b = {p['b']:.4g}, c = {p['c']:.4g}",
            highlight=False,
        )


def write_fit_png(path: Path, report: dict[str, Any]) -> bool:
    """Loss against training FLOPs, log-log: the runs, the fit, and the published fit and models.
    False (and no file) without matplotlib or when drawing fails, one line on stderr saying which."""
    return draw_picture(path, lambda png: _draw_fit_png(png, report))


def _draw_fit_png(path: Path, report: dict[str, Any]) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    runs = report["runs"]
    f = np.array([r["flops"] for r in runs])
    ax.scatter(f, [r["loss"] for r in runs], color="tab:blue", zorder=3, label="runs")
    # The fit over the runs' compute (extrapolated far, it would squash the axes), the
    # published law over its models' and the runs'.
    grid = np.logspace(np.log10(f.min()) - 0.2, np.log10(f.max()) + 0.2, 200)
    law = PowerLaw(**report["fit"])
    ax.plot(grid, law(grid), color="tab:blue", label=f"fit: (f/{law.a:.3g})^{law.b:.3g} + {law.c:.3g}")  # fmt: skip
    pub = report["published"]
    if pub:
        pf = [m[1] for m in pub["models"]]
        lo, hi = min(f.min(), min(pf)), max(f.max(), max(pf))
        span = np.logspace(np.log10(lo) - 0.2, np.log10(hi) + 0.2, 200)
        p = PowerLaw(**pub["fit"])
        ax.plot(
            span,
            p(span),
            color="tab:orange",
            ls="--",
            label=f"{pub['name']}: (f/{p.a:.3g})^{p.b:.3g} + {p.c:.3g}",
        )
        ax.scatter(
            pf,
            [m[2] for m in pub["models"]],
            color="tab:orange",
            marker="s",
            s=18,
            label=f"{pub['name']} models",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    # Plain numbers (6, 7, 8), not 6x10^0, 7x10^0, 8x10^0; losses mostly span under a decade,
    # which has at most one major tick, so the minor ticks are labelled too unless they span more.
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    ax.yaxis.set_minor_formatter(plain if high / low < 10 else NullFormatter())
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel(f"{report['loss']} loss (nats/token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.suptitle("lmpipe scaling: L(f) = (f / a)^b + c", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})


# --- compute-optimal families ----------------------------------------------------------------

SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
COUNTS = ("total", "non-embedding")


def parse_size(text: str) -> tuple[str, float]:
    """('width', d_model) for `768`, ('parameters', N) for `111M` / `1.3B`."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMBTkmbt]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise LmpipeError(
            f"--sizes {text!r}: a width (768) or a parameter count with K, M, B or T (111M, 1.3B)"
        )
    if m.group(2):
        return "parameters", float(m.group(1)) * SUFFIXES[m.group(2).upper()]
    if "." in m.group(1):
        raise LmpipeError(f"--sizes {text!r}: a width is a whole number (or add M or B)")
    return "width", float(m.group(1))


def shape_at(model: ModelConfig, width: int) -> dict[str, int]:
    """The base's model at d_model `width`: its depth at the base's aspect ratio d_model /
    n_layers, heads of its size (where the width allows), d_ff at its ratio."""
    return {
        "d_model": width,
        "n_heads": heads_for(width, model.d_head),
        "d_ff": max(1, round(width * model.d_ff / model.d_model)),
        "n_layers": max(1, round(width * model.n_layers / model.d_model)),
    }


def width_for(model: ModelConfig, parameters: float, count: str = "total") -> int:
    """The width, a multiple of the base's head size, whose model has the parameter count
    (`count`) nearest (in ratio) to `parameters`."""
    from lmpipe.train.model import count_parameters

    best, best_gap = model.d_head, math.inf
    for width in range(model.d_head, 1024 * model.d_model + 1, model.d_head):
        shaped = ModelConfig.model_construct(**{**model.model_dump(), **shape_at(model, width)})
        n = count_parameters(shaped, embeddings=count == "total")
        gap = abs(math.log(n / parameters))
        if gap < best_gap:
            best, best_gap = width, gap
        elif n > parameters:
            break
    return best


def family_member(
    base_name: str,
    overrides: list[str],
    width: int,
    tokens_per_param: float,
    name: str,
    count: str = "total",
) -> Recipe:
    """The base recipe (with `overrides`) at `width`, trained on `tokens_per_param` tokens a
    parameter (counted as `count` says): every stage keeps its share (whole steps); the warmup
    keeps its tokens, as Cerebras-GPT warmed every size up over ~375M tokens (seeds-spec 3.2), at
    least one step and at most the run; checkpoints and validation as often, in tokens, relative
    to the run."""
    from lmpipe.train.model import count_parameters

    base = load_recipe(base_name, overrides)
    sets = [*overrides, *(f"model.{k}={v}" for k, v in shape_at(base.model, width).items())]
    shaped = load_recipe(base_name, sets)
    target = tokens_per_param * count_parameters(shaped.model, embeddings=count == "total")
    total = 0
    for i, stage in enumerate(shaped.stages):
        step = shaped.stage_tokens_per_step(i)
        tokens = max(1, round(target * stage.tokens / shaped.total_tokens / step)) * step
        sets.append(f"stages.{i}.tokens={tokens}")
        total += tokens
    scale = total / shaped.total_tokens
    every = max(shaped.tokens_per_step, round(shaped.checkpoint_every_tokens * scale))
    # The warmup in tokens, not a share of the run: a share would stretch a big member's warmup
    # (2.7B from 111M's: 9.2B tokens) and squeeze a small one's under one step (no warmup at all).
    warmup = min(max(shaped.schedule.warmup_tokens, shaped.tokens_per_step), total)
    sets += [
        f"name={name}",
        f"schedule.warmup_tokens={warmup}",
        f"checkpoint_every_tokens={every}",
    ]
    if shaped.validation:
        sets.append(f"validation.every_tokens={max(1, round(shaped.validation.every_tokens * scale))}")  # fmt: skip
    return load_recipe(base_name, sets)


def family(
    base_name: str,
    sizes: list[str],
    out: Path,
    *,
    tokens_per_param: float = 20.0,
    count: str = "total",
    overrides: list[str] | tuple[str, ...] = (),
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Write one recipe per size into `out` (and family.json, manifest.json); the table's rows."""
    from lmpipe.train.model import count_parameters
    from lmpipe.train.plan import make_plan, training_flops

    if not sizes:
        raise LmpipeError("--sizes: name at least one size (768 or 111M)")
    if not (math.isfinite(tokens_per_param) and tokens_per_param > 0):
        raise LmpipeError(f"--tokens-per-param: {tokens_per_param:g} is not a finite number > 0")
    if count not in COUNTS:
        raise LmpipeError(f"--count: {count!r} is not one of {', '.join(COUNTS)}")
    base = load_recipe(base_name, list(overrides))
    members = []
    for text in sizes:
        kind, value = parse_size(text)
        width = int(value) if kind == "width" else width_for(base.model, value, count)
        name = f"{base.name}-{text.strip().lower() if kind == 'parameters' else f'd{width}'}"
        members.append(
            family_member(base_name, list(overrides), width, tokens_per_param, name, count)
        )
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise LmpipeError(f"--sizes: two sizes give the same recipe ({', '.join(names)})")
    rows = []
    reads = [recipe_file(base_name)]  # a base recipe inside `out`: --overwrite must not delete it
    with staged_output(Path(out), stage="scaling-family", reads=reads, overwrite=overwrite) as work:
        for recipe in members:
            plan = make_plan(recipe)
            n = count_parameters(recipe.model)
            counted = count_parameters(recipe.model, embeddings=count == "total")
            m = recipe.model
            rows.append({
                "recipe": recipe.name, "file": f"{recipe.name}.yaml", "n_layers": m.n_layers,
                "d_model": m.d_model, "n_heads": m.n_heads, "d_ff": m.d_ff, "parameters": n,
                "non_embedding_parameters": count_parameters(m, embeddings=False),
                "tokens": recipe.total_tokens, "tokens_per_parameter": recipe.total_tokens / counted,
                "flops": training_flops(recipe, plan),
            })  # fmt: skip
            per = "parameter" if count == "total" else "non-embedding parameter"
            header = (
                f"# {recipe.name}: {base.name} at d_model {m.d_model}, "
                f"{recipe.total_tokens / counted:.3g} tokens a {per} (lmpipe scaling --family)\n"
            )
            (work / f"{recipe.name}.yaml").write_text(header + recipe_yaml(recipe), encoding="utf-8")  # fmt: skip
        write_json_atomic(
            work / FAMILY_JSON,
            {
                "base": base_name,
                "set": list(overrides),
                "tokens_per_param": tokens_per_param,
                "count": count,
                "recipes": rows,
            },
        )
        write_manifest(
            work,
            "scaling-family",
            base=base_name,
            set=list(overrides),
            tokens_per_param=tokens_per_param,
            count=count,
            recipes=rows,
        )
    print_family(rows, count)
    return rows


def print_family(rows: list[dict[str, Any]], count: str = "total") -> None:
    from rich.console import Console
    from rich.table import Table

    from lmpipe.dataprep.report import print_table

    table = Table(title="compute-optimal family")
    per = "tokens/param" if count == "total" else "tokens/non-emb. param"
    for col in (
        "recipe",
        "layers",
        "d_model",
        "heads",
        "d_ff",
        "parameters",
        "non-emb.",
        "tokens",
        per,
        "FLOPs",
    ):
        table.add_column(col, justify="left" if col == "recipe" else "right", no_wrap=True)
    for r in rows:
        table.add_row(
            r["recipe"],
            str(r["n_layers"]),
            str(r["d_model"]),
            str(r["n_heads"]),
            str(r["d_ff"]),
            f"{r['parameters']:,}",
            f"{r['non_embedding_parameters']:,}",
            f"{r['tokens']:,}",
            f"{r['tokens_per_parameter']:.3g}",
            f"{r['flops']:.3g}",
        )
    print_table(Console(), table)
