"""A sweep's plan: its settings, the `--grid` / `--space` syntax, and every point as the recipe
file plus a list of `--set` options, validated like `lmpipe train`'s before anything runs.

Points are the product of `--param`, `--densities`, `--widths` and the swept values (the grid
axes' product, times `--random N` draws from the `--space` dimensions, seeded by `seed`):

  - a width w is the recipe's model at d_model w: d_ff at the recipe's ratio, heads of the
    recipe's size where w allows it, muP's base shapes unchanged (so m_d = w / d_model_base and
    the base values stay the proxy's); a density is `model.density` (sparse muP, seeds-spec 4);
    `sp` is the same model in the standard parametrisation (`model.mup: null`, every matrix at
    init std sigma_base, one learning rate optimizer.lr); `mup-uncorrected` is muP without
    SμPar's density correction (`model.mup.sparse_correction: false`: a sparse model's hidden init
    and Adam rate by m_d alone, as dense muP would set them), the comparison SμPar is made against;
  - a swept `optimizer.lr` moves `schedule.end_lr` with it (their ratio stays the recipe's);
  - `tokens` gives every point that many tokens (stages and warmup scaled alike); the held-out
    loss is scored once, at the end of each point (`validation.every_tokens` = its tokens).

The plan (what `sweep-plan.json` holds) is the recipe (its name or path as given, its file's
absolute path, its text, and its settings with the sweep's `--set`), the sweep's `--set`, the
data (absolute paths, and each source's identity: its shards' checksums, `data.data_identity`)
and every point's name, group, values and `--set` list: two commands whose plans agree but for
where the recipe file and the token folders lie (and the recipe's comments) train the same runs. Planning reads the token folders' manifests, not their tokens.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import is_int, is_number
from lmpipe.dataprep.runner import ENGINES
from lmpipe.train.data import data_identity, open_sources
from lmpipe.train.recipe import (
    DataSource,
    ModelConfig,
    Recipe,
    apply_override,
    parse_recipe,
    parse_yaml,
    recipe_file,
    recipe_source,
    validate_recipe,
)

# muP (SμPar at a density below 1), muP without SμPar's density correction, and SP.
PARAMS = ("mup", "mup-uncorrected", "sp")
VAL_TOKENS = 65536  # held-out tokens scored per point unless the recipe or --val-tokens says
# Keys the sweep sets itself from --widths / --densities / --param; a grid over them would fight.
SHAPE_KEYS = ("model.d_model", "model.n_heads", "model.d_ff", "model.density", "model.mup")
# What an SP point of a muP recipe drops (`model.mup: null`) or sets itself (init std from
# sigma_base): a swept value of these would label identical SP runs with different values.
SP_DROPS = ("model.init_std", "model.mup.")

GRID_FORMS = "KEY=START:STOP:xFACTOR, KEY=START:STOP:+STEP or KEY=V1,V2,... (numbers may be B^E)"


@dataclass(frozen=True)
class Axis:
    """One `--grid` key and its values."""

    key: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Dimension:
    """One `--space` key of a random search, drawn uniformly (or log-uniformly) in [low, high]."""

    key: str
    kind: Literal["uniform", "loguniform"]
    low: float
    high: float


@dataclass(frozen=True)
class SweepSettings:
    """What a sweep trains. `data`: one token folder or named sources (as `lmpipe train --data`),
    None for the recipe's own; `widths`, `densities`, `params` empty: the recipe's own."""

    recipe: str
    data: Path | tuple[DataSource, ...] | None = None
    overrides: tuple[str, ...] = ()
    grid: tuple[Axis, ...] = ()
    space: tuple[Dimension, ...] = ()
    random: int = 0
    widths: tuple[int, ...] = ()
    densities: tuple[float, ...] = ()
    params: tuple[str, ...] = ()
    tokens: int | None = None
    val_tokens: int | None = None
    seed: int = 0
    jobs: int = 1
    engine: str = "local"  # or "ray": points as Ray tasks (dataprep/runner.py)

    @property
    def keys(self) -> list[str]:
        return [a.key for a in self.grid] + [d.key for d in self.space]


@dataclass(frozen=True)
class Point:
    """One training run of the sweep: its group (parametrisation, width, density), the swept
    values, and the `--set` options that make it from the recipe file (the sweep's own included)."""

    name: str
    param: str
    width: int
    density: float
    values: dict[str, Any] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()


# --- parsing ---------------------------------------------------------------------------------


def parse_number(text: str) -> float:
    """A number as the grid takes it: `6.0e-4`, `0.01`, or a power `2^-10`."""
    base, caret, power = text.strip().partition("^")
    try:
        return float(base) ** float(power) if caret else float(base)
    except (ValueError, OverflowError):
        raise ValueError(text) from None


def parse_grid(text: str) -> Axis:
    """`--grid KEY=START:STOP:xFACTOR` (geometric, STOP included when reached), `:+STEP`
    (arithmetic), or `KEY=V1,V2,...` (numbers, or YAML values such as `cosine`)."""
    key, sep, spec = text.partition("=")
    bad = LmpipeError(f"--grid {text!r}: expected {GRID_FORMS}")
    if not sep or not key or not spec or any(c.isspace() for c in key):
        raise bad
    parts = spec.split(":")
    if len(parts) == 1:
        values = tuple(_grid_value(v, text) for v in spec.split(","))
        return Axis(key, values)
    if len(parts) != 3 or parts[2][:1] not in ("x", "+"):
        raise bad
    try:
        start, stop, by = parse_number(parts[0]), parse_number(parts[1]), parse_number(parts[2][1:])
    except ValueError:
        raise bad from None
    geometric = parts[2][0] == "x"
    if not (stop >= start and (by > 1 if geometric else by > 0)) or (geometric and start <= 0):
        raise LmpipeError(
            f"--grid {text!r}: needs START <= STOP and a "
            + ("factor > 1 and START > 0" if geometric else "step > 0")
        )
    n = (math.log(stop / start) / math.log(by) if geometric else (stop - start) / by) + 1e-9
    if n > 10_000:
        raise LmpipeError(f"--grid {text!r}: {int(n) + 1} values; a sweep takes at most 10,000")
    values = tuple(_tidy(start * by**i if geometric else start + by * i) for i in range(int(n) + 1))
    return Axis(key, values)


def _grid_value(text: str, option: str) -> Any:
    try:
        return _tidy(parse_number(text))
    except ValueError:
        pass
    try:
        value = parse_yaml(text) if text.strip() else None
    except yaml.YAMLError:
        value = None
    if value is None or isinstance(value, dict | list):
        raise LmpipeError(f"--grid {option!r}: {text!r} is not a value; expected {GRID_FORMS}")
    return value


def _tidy(x: float) -> float:
    """12 significant digits: 0.1 * 3 is 0.3 in a recipe and a plot, not 0.30000000000000004."""
    return float(f"{x:.12g}")


def parse_space(text: str) -> Dimension:
    """`--space KEY=loguniform:LOW:HIGH` or `KEY=uniform:LOW:HIGH`."""
    key, sep, spec = text.partition("=")
    parts = spec.split(":")
    bad = LmpipeError(f"--space {text!r}: expected KEY=loguniform:LOW:HIGH or KEY=uniform:LOW:HIGH")
    if not sep or not key or len(parts) != 3 or parts[0] not in ("uniform", "loguniform"):
        raise bad
    try:
        low, high = parse_number(parts[1]), parse_number(parts[2])
    except ValueError:
        raise bad from None
    if not low < high or (parts[0] == "loguniform" and low <= 0):
        raise LmpipeError(f"--space {text!r}: needs LOW < HIGH (and LOW > 0 for loguniform)")
    return Dimension(key, parts[0], low, high)  # type: ignore[arg-type]


def yaml_value(value: Any) -> str:
    """A value as `--set` takes it: YAML that reads back as the same value (`1.0e-05`, not
    `1e-05`, which YAML 1.1 reads as a string)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6)
    return text.removesuffix("\n").removesuffix("\n...").strip()


# --- the plan: base recipe and points --------------------------------------------------------


def resolve_data(recipe: Recipe, data: Path | tuple[DataSource, ...] | None) -> list[DataSource]:
    """The sweep's token folders, as absolute paths: the run folders can be read from anywhere."""
    if data is None:
        if not recipe.data:
            raise LmpipeError("--data is required: the recipe has no data section")
        sources = list(recipe.data)
    elif isinstance(data, Path | str):
        sources = [DataSource(name="data", path=Path(data))]
    else:
        sources = list(data)
    return [s.model_copy(update={"path": s.path.resolve()}) for s in sources]


def lookup(tree: Any, key: str) -> Any:
    """The value at a dotted key of a recipe's dump; KeyError naming the part that is missing."""
    node = tree
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(part)
    return node


def check_keys(settings: SweepSettings, recipe: Recipe) -> None:
    dump = recipe.model_dump(mode="json")
    keys = settings.keys
    for option, key in [("--grid", a.key) for a in settings.grid] + [
        ("--space", d.key) for d in settings.space
    ]:
        try:
            value = lookup(dump, key)
        except KeyError as e:
            raise LmpipeError(
                f"{option} {key}: unknown key ({e.args[0]!r} is not in recipe {recipe.name})"
            ) from None
        if isinstance(value, dict | list):
            raise LmpipeError(f"{option} {key}: a section, not a value; sweep one of its keys")
        if key in SHAPE_KEYS:
            raise LmpipeError(
                f"{option} {key}: set by the sweep itself; use --widths, --densities or --param"
            )
        if (
            "sp" in settings.params
            and recipe.model.mup is not None
            and key.startswith(SP_DROPS)
            and key != "model.mup.sigma_base"
        ):
            raise LmpipeError(
                f"{option} {key}: has no effect on the --param sp points (SP drops model.mup and "
                "takes its init std from model.mup.sigma_base); sweep sigma_base, or leave out sp"
            )
        numeric = is_number(value)
        for v in next((a.values for a in settings.grid if a.key == key), ()):
            # A power past float's range (2^2000) reads back as the text it was.
            if numeric and not is_number(v):
                raise LmpipeError(
                    f"--grid {key}: {v!r} is not a number (or is past float's range); the "
                    f"recipe's {key} is {value}"
                )
    if len(set(keys)) != len(keys):
        raise LmpipeError(f"--grid/--space: a key appears twice ({', '.join(keys)})")
    if settings.random < 0:
        raise LmpipeError(f"--random: {settings.random} is not a number of points")
    if settings.seed < 0:
        raise LmpipeError(f"--seed: {settings.seed} is not a seed (0 or more)")
    if settings.val_tokens is not None and settings.val_tokens < 1:
        raise LmpipeError(f"--val-tokens {settings.val_tokens}: at least 1")
    if settings.random and not settings.space:
        raise LmpipeError("--random: name what to draw with --space KEY=loguniform:LOW:HIGH")
    if settings.space and not settings.random:
        raise LmpipeError("--space: give the number of random points with --random N")
    bad_param = [p for p in settings.params if p not in PARAMS]
    if bad_param:
        raise LmpipeError(f"--param: {', '.join(PARAMS)} (got {', '.join(bad_param)})")
    for param in settings.params:
        if param.startswith("mup") and recipe.model.mup is None:
            raise LmpipeError(
                f"--param {param}: recipe {recipe.name} has no muP base shapes (model.mup is null)"
            )
    for w in settings.widths:
        if w < 1:
            raise LmpipeError(f"--widths: {w} is not a width")
    for d in settings.densities:
        if not 0 < d <= 1:
            raise LmpipeError(f"--densities: {d:g} is not in (0, 1]")
    if settings.tokens is not None and settings.tokens < 1:
        raise LmpipeError(f"--tokens: {settings.tokens} is not a number of tokens")
    if settings.jobs < 1:
        raise LmpipeError(f"-j: {settings.jobs} is not a number of processes")
    if settings.engine not in ENGINES:
        raise LmpipeError(f"--engine: {settings.engine!r} is not one of {', '.join(ENGINES)}")


def value_sets(settings: SweepSettings, recipe: Recipe) -> list[dict[str, Any]]:
    """The swept values of every point of a group: grid product, times random draws."""
    dump = recipe.model_dump(mode="json")

    def typed(key: str, value: Any) -> Any:  # 2^10 for an integer key is 1024, not 1024.0
        whole = is_int(lookup(dump, key)) and isinstance(value, float) and value.is_integer()
        return int(value) if whole else value

    grid = [dict(zip([a.key for a in settings.grid], combo, strict=True))
            for combo in itertools.product(*(a.values for a in settings.grid))]  # fmt: skip
    draws: list[dict[str, Any]] = [{}]
    if settings.random:
        rng = np.random.default_rng(settings.seed)
        draws = []
        for _ in range(settings.random):
            draw = {}
            for d in settings.space:
                if d.kind == "loguniform":
                    x = math.exp(rng.uniform(math.log(d.low), math.log(d.high)))
                else:
                    x = rng.uniform(d.low, d.high)
                draw[d.key] = float(f"{x:.6g}")  # readable in a recipe; far finer than any optimum
            draws.append(draw)
    return [{k: typed(k, v) for k, v in {**g, **d}.items()} for g in grid or [{}] for d in draws]


def heads_for(width: int, d_head: int) -> int:
    """Heads of the recipe's size when the width is a multiple of it; else the count whose head
    size comes nearest (in ratio) among the divisors of the width."""
    if width % d_head == 0:
        return width // d_head
    divisors = [h for h in range(1, width + 1) if width % h == 0]
    return min(divisors, key=lambda h: (abs(math.log(width / h / d_head)), h))


def width_sets(model: ModelConfig, width: int) -> list[str]:
    """`--set` options for the recipe's model at d_model `width`: d_ff at its ratio, heads of its
    size where possible; muP's base shapes stay, so m_d = width / d_model_base."""
    d_ff = max(1, round(width * model.d_ff / model.d_model))
    n_heads = heads_for(width, model.d_head)
    return [f"model.d_model={width}", f"model.n_heads={n_heads}", f"model.d_ff={d_ff}"]


def token_sets(recipe: Recipe, tokens: int) -> list[str]:
    """`--set` options giving the recipe `tokens` tokens: every stage and the warmup scaled by
    the same factor, each stage a whole number of steps (at least one)."""
    scale = tokens / recipe.total_tokens
    sets, total = [], 0
    for i, stage in enumerate(recipe.stages):
        step = recipe.stage_tokens_per_step(i)
        n = max(1, round(stage.tokens * scale / step)) * step
        sets.append(f"stages.{i}.tokens={n}")
        total += n
    warmup = round(recipe.schedule.warmup_tokens * total / recipe.total_tokens)
    return [*sets, f"schedule.warmup_tokens={warmup}"]


def check_trains(recipe: Recipe, name: str) -> None:
    """Refuse a point of one step under a warmup: the warmup starts at a rate of 0, so its only
    step updates nothing, and every point would tie at its initial loss (a "best" by order)."""
    steps = sum(s.tokens // recipe.stage_tokens_per_step(i) for i, s in enumerate(recipe.stages))
    if steps == 1 and recipe.schedule.warmup_tokens > 0:
        step = recipe.stage_tokens_per_step(0)
        raise LmpipeError(
            f"sweep point {name}: one step of {step:,} tokens, at a learning rate of 0 (the "
            f"warmup starts at 0), trains nothing; give --tokens at least two steps ({2 * step:,})"
        )


def plan_points(settings: SweepSettings) -> tuple[dict[str, Any], list[Point], list[Recipe]]:
    """The sweep's plan (what its plan file holds), its points and their validated recipes."""
    label, text = recipe_source(settings.recipe)
    raw, recipe = parse_recipe(label, text, settings.overrides)
    check_keys(settings, recipe)
    sources = resolve_data(recipe, settings.data)
    data = [s.model_dump(mode="json") for s in sources]
    shared = list(settings.overrides)
    if settings.tokens is not None:
        shared += token_sets(recipe, settings.tokens)
    model = recipe.model
    params = settings.params or (("mup",) if model.mup is not None else ("sp",))
    widths = settings.widths or (model.d_model,)
    densities = settings.densities or (model.density,)
    values = value_sets(settings, recipe)
    val_tokens = settings.val_tokens
    if val_tokens is None:  # not `or`: --val-tokens 0 is refused, never read as "the default"
        val_tokens = recipe.validation.tokens if recipe.validation else VAL_TOKENS
    points: list[Point] = []
    recipes: list[Recipe] = []
    for param, density, width, chosen in itertools.product(params, densities, widths, values):
        name = f"{len(points):04d}-{param}-w{width}" + (f"-rho{density:g}" if density != 1 else "")
        sets = list(shared) + [f"{k}={yaml_value(v)}" for k, v in chosen.items()]
        if "optimizer.lr" in chosen and "schedule.end_lr" not in chosen:
            ratio = recipe.schedule.end_lr / recipe.optimizer.lr  # the recipe's decay, kept
            sets.append(f"schedule.end_lr={yaml_value(_tidy(chosen['optimizer.lr'] * ratio))}")
        if width != model.d_model:
            sets += width_sets(model, width)
        if density != model.density:
            sets.append(f"model.density={yaml_value(density)}")
        point_raw = copy.deepcopy(raw)
        for assignment in sets[len(settings.overrides) :]:
            apply_override(point_raw, assignment)
        if param == "mup-uncorrected":
            # Dense muP's rules on the sparse model: init and Adam rate by m_d alone.
            apply_override(point_raw, "model.mup.sparse_correction=false")
            sets.append("model.mup.sparse_correction=false")
        if param == "sp" and model.mup is not None:
            # SP: the same model with every muP multiplier 1; its one init std is sigma_base
            # (swept or not), its one learning rate optimizer.lr.
            sigma = (point_raw["model"].get("mup") or {}).get("sigma_base", model.mup.sigma_base)
            extra = ["model.mup=null", f"model.init_std={yaml_value(sigma)}"]
            for assignment in extra:
                apply_override(point_raw, assignment)
            sets += extra
        where = f"sweep point {name} ({label}, --set {' '.join(sets[len(settings.overrides) :]) or '(none)'})"
        total = validate_recipe({**point_raw, "data": data}, where).total_tokens
        # The held-out loss once, at the end of the point: every point is compared there.
        validation = f"validation={{every_tokens: {total}, tokens: {val_tokens}}}"
        apply_override(point_raw, validation)
        sets.append(validation)
        recipes.append(validate_recipe({**point_raw, "data": data}, where))
        check_trains(recipes[-1], name)
        points.append(Point(name, param, width, density, chosen, tuple(sets)))
    path = recipe_file(settings.recipe)
    plan = {
        "recipe": settings.recipe,
        # What the runs are made of, for a rerun's plan check: the recipe's settings with the
        # sweep's --set (a file may be edited, a shipped recipe upgraded; a comment or a moved
        # `data` path changes nothing) and each source's tokens, by the digest a resumed
        # `lmpipe train` checks. `--best` transfers into the text (a relative path would be read
        # from another folder).
        "recipe_path": str(path.resolve()) if path else None,
        "recipe_text": text,
        "recipe_settings": recipe.model_dump(mode="json", exclude={"data"}),
        "set": list(settings.overrides),
        "data": data,
        "data_identity": data_identity(open_sources(recipes[0])),
        "keys": settings.keys,
        "points": [asdict(p) for p in points],
    }
    return json.loads(json.dumps(plan)), points, recipes  # as its file reads back
