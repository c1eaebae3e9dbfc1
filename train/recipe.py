"""Recipes: one YAML file holds a whole run (model, optimizer, LR schedule, sequence-length stages).

A recipe is validated into frozen pydantic models that reject unknown keys; every error is
reported at once with its dotted path (`model.n_heads: ...`). `--set dotted.key=value` overrides
are applied to the raw YAML before validation, so they are checked like the file itself. Values
that can be computed (steps per stage, batch sizes, accumulation, the DeepSpeed config) are not
written in recipes: `lmpipe.train.plan` derives them.

Shipped recipes live in the `lmpipe.recipes` package (`--recipe tiny`); any other value of
`--recipe` is a path to a YAML file.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lmpipe.dataprep.errors import LmpipeError


class Section(BaseModel):
    # A number of a recipe is finite: `.inf` or `.nan` from YAML is an error naming its key.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class MupConfig(Section):
    """muP's base shapes and tuned multipliers (seeds-spec 1.3; BTLM's values by default)."""

    d_model_base: float = Field(256, gt=0, description="width of the tuned proxy model")
    d_ff_base: float = Field(682.6, gt=0, description="FFN width of the proxy (BTLM: 256 * 8/3)")
    sigma_base: float = Field(0.073, gt=0, description="init std of the proxy")
    alpha_in: float = Field(14.6, gt=0, description="embedding output multiplier")
    alpha_out: float = Field(2.22, gt=0, description="output logit multiplier, divided by m_d")
    qk_scale: Literal["d_head", "sqrt_d_head"] = "d_head"
    sparse_correction: bool = Field(
        True,
        description="SμPar: a sparse model's hidden init variance and Adam rate also divided by "
        "the density m_rho; false: dense muP's rules on the sparse model (for comparison)",
    )


class ModelConfig(Section):
    """The model's shape and options. Defaults are BTLM's: ALiBi, SwiGLU, muP. Cerebras-GPT is
    `position: learned` (with `n_positions`) and `mlp: gelu`, in muP or, with `mup: null`, the
    standard parametrisation (every weight at `init_std`, 0.02 unless set; residual projections
    / sqrt(2L))."""

    SP_INIT_STD: ClassVar[float] = 0.02

    n_layers: int = Field(gt=0)
    n_heads: int = Field(gt=0)
    d_model: int = Field(gt=0)
    d_ff: int = Field(gt=0)
    vocab_size: int = Field(50257, gt=0)
    layer_norm_eps: float = Field(1e-5, gt=0)
    position: Literal["alibi", "learned"] = "alibi"
    n_positions: int = Field(2048, gt=0, description="learned positions: the longest sequence")
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    attn_impl: Literal["auto", "sdpa", "flex"] = "auto"
    # How the model runs, not what it computes (lmpipe.train.model; a resumed run may change them):
    loss_impl: Literal["auto", "plain", "chunked"] = Field(
        "auto", description="chunked: no [tokens, vocab] logits in training; auto: chunked on CUDA"
    )
    loss_chunk_tokens: int = Field(
        4096, gt=0, description="chunked loss: logit rows at a time (4,096 x 50,257: 0.8 GB fp32)"
    )
    activation_checkpointing: str = Field(
        "none",
        pattern=r"^(none|full|every_[1-9][0-9]*)$",
        description="recompute blocks in the backward pass: none, full or every_N (every N-th)",
    )
    compile: Literal["auto", "none", "blocks"] = Field(
        "auto", description="blocks: torch.compile each block (and the chunked loss); auto: on CUDA"
    )
    mup: MupConfig | None = Field(MupConfig(), description="muP's base shapes; null: SP")
    init_std: float | None = Field(
        None, gt=0, description="SP only: the init std (default 0.02, Cerebras-GPT's)"
    )
    density: float = Field(
        1.0,
        gt=0,
        le=1,
        description="share of non-zero weights in every attention and FFN projection (sparse muP)",
    )

    @model_validator(mode="after")
    def _shapes_fit(self) -> ModelConfig:
        problems = []
        if self.d_model % self.n_heads:
            problems.append(
                f"d_model ({self.d_model}) is not divisible by n_heads ({self.n_heads})"
            )
        if self.mup is not None and self.init_std is not None:
            problems.append("init_std is the standard parametrisation's; muP's is mup.sigma_base")
        if self.mup is not None:
            m_d, m_ffn = self.d_model / self.mup.d_model_base, self.d_ff / self.mup.d_ff_base
            # One width multiplier for the whole model: an FFN base of another shape (a SwiGLU
            # base of 8/3 d under a 4 d GELU, say) would give the FFN other muP rates than the rest.
            if abs(m_ffn / m_d - 1) > 0.01:
                problems.append(
                    f"mup.d_ff_base ({self.mup.d_ff_base:g}) does not fit: d_ff / d_ff_base = "
                    f"{m_ffn:.4g} must equal d_model / d_model_base = {m_d:.4g} (the proxy has "
                    f"this model's FFN ratio, {self.d_ff / self.d_model:.4g})"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def checkpoint_every(self) -> int:
        """Activation checkpointing of blocks 0, N, 2N, ... (1: every block); 0: none."""
        setting = self.activation_checkpointing
        named = {"none": 0, "full": 1}
        return named[setting] if setting in named else int(setting.removeprefix("every_"))


class OptimizerConfig(Section):
    """AdamW. `lr` is eta_base, the peak rate of embeddings, biases and norms; muP scales the
    hidden matrices' rates from it."""

    lr: float = Field(gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="global gradient norm; 0 disables")


class ScheduleConfig(Section):
    """One LR schedule across all stages, in tokens: linear warmup from 0, then decay to `end_lr`
    at the end of the run (a multiplier on every group's own base rate)."""

    warmup_tokens: int = Field(ge=0)
    decay: Literal["linear", "cosine"] = "linear"
    end_lr: float = Field(ge=0)


class DataSource(Section):
    """One token folder of a mixture: its name (for stage weights, the plan and metrics), where
    it is, and its share of every batch (weights are normalised over the sources a stage draws)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    path: Path
    weight: float = Field(1.0, gt=0, allow_inf_nan=False)


class ValidationConfig(Section):
    """Held-out loss during training, per source: the first `tokens` tokens of each source's
    held-out split, in windows of the current stage's length, every `every_tokens` trained."""

    every_tokens: int = Field(gt=0)
    tokens: int = Field(gt=0)


class GuardConfig(Section):
    """When a run stops by itself (`lmpipe.train.guard`). A step whose loss or gradient norm is
    not finite is skipped on every rank; `max_bad_steps` of them in a row stop the run, and so
    does a loss spike: above the mean loss of the last `spike_window` steps by `spike_margin`
    nats (an absolute margin: a ratio would flag noise once a loss is near 0) and by
    `spike_sigmas` times those losses' step-to-step noise (a small batch's; `guard.step_noise`)."""

    max_bad_steps: int = Field(5, ge=1, description="skipped steps in a row that stop the run")
    spike_margin: float | None = Field(
        1.0, gt=0, description="stop at a loss this many nats above the running mean; null: never"
    )
    spike_window: int = Field(
        50, ge=1, description="good steps the running mean holds (and the check waits for)"
    )
    spike_sigmas: float | None = Field(
        6.0,
        gt=0,
        description="a spike is also this many times the window's step-to-step noise above its "
        "mean; null: the margin alone",
    )


class Stage(Section):
    seq_len: int = Field(gt=0)
    tokens: int = Field(gt=0)
    weights: dict[str, float] | None = Field(
        None, description="this stage's mixture: source name -> weight (default: data's weights)"
    )
    tokens_per_step: int | None = Field(
        None, gt=0, description="this stage's global batch in tokens (default: the recipe's)"
    )
    alibi_scale: float = Field(
        1.0,
        ge=1,
        description="fixed ALiBi interpolation: slopes divided by it (seeds-spec 2: L_ft / L_train)",
    )


class Recipe(Section):
    name: str
    model: ModelConfig
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    stages: list[Stage] = Field(min_length=1)
    tokens_per_step: int = Field(
        gt=0, description="global batch in tokens, in every stage that states none of its own"
    )
    micro_batch_tokens: int = Field(gt=0, description="tokens one rank runs forward at once")
    precision: Literal["bf16", "fp32"] = "bf16"
    zero_stage: int = Field(1, ge=0, le=3)
    seed: int = 1
    checkpoint_every_tokens: int = Field(gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    data: list[DataSource] | None = Field(
        None, description="token folders and weights (or --data); one folder trains as ever"
    )
    warn_epochs: float = Field(
        4.0, gt=0, description="warn when a stage reads more than this many epochs of a source"
    )
    validation: ValidationConfig | None = None
    guard: GuardConfig = GuardConfig()

    @model_validator(mode="after")
    def _shapes_fit(self) -> Recipe:
        problems = self._mixture_problems()
        if self.tokens_per_step % self.micro_batch_tokens:
            problems.append(
                f"tokens_per_step ({self.tokens_per_step}) is not a multiple of "
                f"micro_batch_tokens ({self.micro_batch_tokens})"
            )
        model = self.model
        for i, stage in enumerate(self.stages):
            step_tokens = self.stage_tokens_per_step(i)
            if stage.tokens_per_step is not None and step_tokens % self.micro_batch_tokens:
                problems.append(
                    f"stages.{i}.tokens_per_step ({step_tokens}) is not a multiple of "
                    f"micro_batch_tokens ({self.micro_batch_tokens})"
                )
            if self.micro_batch_tokens % stage.seq_len:
                problems.append(
                    f"stages.{i}.seq_len ({stage.seq_len}) does not divide "
                    f"micro_batch_tokens ({self.micro_batch_tokens})"
                )
            if stage.tokens % step_tokens:
                problems.append(
                    f"stages.{i}.tokens ({stage.tokens}) is not a whole number of steps of {step_tokens} tokens"
                )
            if model.position == "learned" and stage.seq_len > model.n_positions:
                problems.append(
                    f"stages.{i}.seq_len ({stage.seq_len}) exceeds model.n_positions "
                    f"({model.n_positions}): learned positions end there"
                )
            if model.position == "learned" and stage.alibi_scale != 1:
                problems.append(
                    f"stages.{i}.alibi_scale ({stage.alibi_scale:g}) needs model.position alibi, not learned"
                )
        if self.precision == "bf16" and self.zero_stage == 0:
            # DeepSpeed 0.19.8 keeps no fp32 master weights for a bf16 model without ZeRO: every
            # update would be rounded to bf16 (seeds-spec 1.4 asks for fp32 masters).
            problems.append(
                "precision bf16 needs zero_stage >= 1 (ZeRO-0 would train in pure bf16)"
            )
        if self.schedule.end_lr > self.optimizer.lr:
            problems.append(
                f"schedule.end_lr ({self.schedule.end_lr}) exceeds optimizer.lr ({self.optimizer.lr})"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _mixture_problems(self) -> list[str]:
        names = [source.name for source in self.data or []]
        problems = [
            f"data.{i}.name: {name!r} names two sources"
            for i, name in enumerate(names)
            if name in names[:i]
        ]
        for i, stage in enumerate(self.stages):  # (names are checked once the data is known)
            if stage.weights is None:
                continue
            if not stage.weights:
                problems.append(f"stages.{i}.weights: names no source")
            for name, weight in stage.weights.items():
                if self.data is not None and name not in names:
                    problems.append(
                        f"stages.{i}.weights.{name}: no such source (data: {', '.join(names)})"
                    )
                if not 0 < weight < math.inf:
                    problems.append(
                        f"stages.{i}.weights.{name}: weight {weight:g} is not a finite number > 0"
                    )
        return problems

    @property
    def total_tokens(self) -> int:
        return sum(stage.tokens for stage in self.stages)

    def stage_weights(self, index: int) -> dict[str, float]:
        """Source name -> normalised weight of stage `index` (absent sources are not drawn)."""
        raw = self.stages[index].weights or {s.name: s.weight for s in self.data or []}
        top = max(raw.values())  # first to the largest: no overflow summing huge weights
        total = sum(w / top for w in raw.values())
        return {name: w / top / total for name, w in raw.items()}

    def stage_tokens_per_step(self, index: int) -> int:
        return self.stages[index].tokens_per_step or self.tokens_per_step


class _RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one
    quietly, so a second `lr:` further down a file would silently win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in first:
                raise yaml.YAMLError(
                    f"key {key!r} appears twice in one mapping, at lines {first[key]} and {line}"
                )
            first[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """Safe YAML (no tags that build objects), duplicate keys refused."""
    return yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader: builds no objects


def shipped_recipes() -> list[str]:
    return sorted(
        p.name[: -len(".yaml")]
        for p in resources.files("lmpipe.recipes").iterdir()
        if p.name.endswith(".yaml")
    )


def recipe_file(name_or_path: str) -> Path | None:
    """The file a `--recipe` value names (a .yaml / .yml name, or one with a folder), None for a
    shipped recipe's name. A stage's output must not be or hold it: `--overwrite` would delete
    the recipe the stage was started with."""
    path = Path(name_or_path)
    return path if path.suffix in (".yaml", ".yml") or "/" in name_or_path else None


def recipe_source(name_or_path: str) -> tuple[str, str]:
    """(label, YAML text) of a shipped recipe name or a file path."""
    path = recipe_file(name_or_path)
    if path is not None:
        if not path.is_file():
            raise LmpipeError(f"{path}: no such recipe file")
        try:
            return str(path), path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise LmpipeError(f"{path}: not UTF-8 text (byte {e.start})") from None
    shipped = resources.files("lmpipe.recipes") / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise LmpipeError(
            f"recipe {name_or_path!r}: not a file and not a shipped recipe ({', '.join(shipped_recipes())})"
        )
    return f"{name_or_path}.yaml", shipped.read_text(encoding="utf-8")


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value`; the value is read as YAML (`4`, `6.0e-4`, `[0.9, 0.95]`)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise LmpipeError(f"--set {assignment!r}: expected dotted.key=value")
    *parents, last = key.split(".")
    node: Any = raw
    for part in parents:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict):
            if node.get(part) is None:  # absent, or null (SP's `mup: null`): a section to fill
                node[part] = {}
            node = node[part]
        else:
            raise LmpipeError(f"--set {key}: {part!r} is not an index of the list")
        if not isinstance(node, dict | list):
            raise LmpipeError(f"--set {key}: {part!r} is not a section")
    try:
        value = parse_yaml(text) if text else ""
    except yaml.YAMLError as e:
        raise LmpipeError(f"--set {key}: not a YAML value ({str(e).splitlines()[0]})") from None
    if isinstance(node, list):
        if not (last.isdigit() and int(last) < len(node)):
            raise LmpipeError(f"--set {key}: {last!r} is not an index of the list")
        node[int(last)] = value
    else:
        node[last] = value


def validate_recipe(raw: Any, label: str) -> Recipe:
    if not isinstance(raw, dict):
        raise LmpipeError(f"{label}: a recipe is a YAML mapping")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown key"
            problems.append(f"{where}: {message}" if where else message)
        raise LmpipeError(f"{label}: " + "; ".join(problems)) from None


def parse_recipe(
    label: str, text: str, overrides: tuple[str, ...] | list[str] = ()
) -> tuple[dict[str, Any], Recipe]:
    """A recipe's text with `--set` options applied: (raw YAML mapping, validated)."""
    try:
        raw = parse_yaml(text)
    except yaml.YAMLError as e:
        raise LmpipeError(f"{label}: not valid YAML ({str(e).splitlines()[0]})") from None
    for assignment in overrides:
        apply_override(raw, assignment)
    return raw, validate_recipe(raw, label)


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    return parse_recipe(*recipe_source(name_or_path), overrides)[1]


def recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
