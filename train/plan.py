"""What a recipe means for a given number of ranks: steps, batches, accumulation, the LR schedule
and the DeepSpeed config. All derived, never written by hand; `--dry-run` prints it and every run
saves it.

Tokens per step are usually the same in every stage, so when the sequence length grows 4x the
global batch shrinks 4x in sequences, and with a fixed `micro_batch_tokens` the gradient
accumulation stays the same: only the loader's window length and the micro-batch's number of
sequences change at a stage switch. A stage may state its own `tokens_per_step` (Cerebras-GPT
13B: 720, then 1,080 sequences of 2,048 from step 57,000); its gradient accumulation then differs,
and the loop tells DeepSpeed at the switch. The LR schedule stays one schedule in tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.mixture import StageSource, counts, quotas
from lmpipe.dataprep.report import print_table
from lmpipe.train.launch import launch_world_size
from lmpipe.train.recipe import DataSource, Recipe, ScheduleConfig, recipe_yaml


@dataclass(frozen=True)
class StagePlan:
    index: int
    seq_len: int
    tokens: int
    steps: int
    first_step: int  # global step at which the stage begins
    region_start: int  # stream token where the stage's data begins (tokens of earlier stages)
    tokens_per_step: int  # global batch in tokens
    global_batch: int  # sequences per optimizer step, all ranks
    micro_batch: int  # sequences per rank per forward
    grad_accum: int  # micro-steps per optimizer step on each rank
    alibi_scale: float  # fixed ALiBi interpolation of the stage (1: none)
    sources: tuple[StageSource, ...]  # what the stage draws from each token folder (mixture.py)

    def tokens_at(self, step: int) -> int:
        """Tokens trained after global step `step` (within or at the end of this stage)."""
        return self.region_start + (step - self.first_step) * self.tokens_per_step


@dataclass(frozen=True)
class Plan:
    world_size: int
    total_steps: int
    total_tokens: int
    n_params: int
    stages: tuple[StagePlan, ...]

    def stage_at(self, step: int) -> StagePlan:
        for stage in self.stages:
            if step < stage.first_step + stage.steps:
                return stage
        return self.stages[-1]

    def tokens_at(self, step: int) -> int:
        """Tokens trained after `step` optimizer steps: the schedule's clock."""
        for stage in self.stages:
            if step <= stage.first_step + stage.steps:
                return stage.tokens_at(step)
        return self.total_tokens

    @property
    def grad_accum(self) -> int:
        """The first stage's accumulation: DeepSpeed's config at start."""
        return self.stages[0].grad_accum


def make_plan(recipe: Recipe, world_size: int = 1) -> Plan:
    from lmpipe.train.model import count_parameters  # torch import, only when planning

    per_rank_micro_tokens = recipe.micro_batch_tokens * world_size
    stages, step, region = [], 0, 0
    drawn = {name: 0 for name in source_names(recipe)}  # tokens each source gave earlier stages
    for i, s in enumerate(recipe.stages):
        step_tokens = recipe.stage_tokens_per_step(i)
        if step_tokens % per_rank_micro_tokens:
            where = f"stages.{i}.tokens_per_step" if s.tokens_per_step else "tokens_per_step"
            raise LmpipeError(
                f"{where} ({step_tokens}) is not a multiple of micro_batch_tokens x world size "
                f"({recipe.micro_batch_tokens} x {world_size}); change either with --set"
            )
        steps = s.tokens // step_tokens
        weights = recipe.stage_weights(i) if recipe.data else {"data": 1.0}
        names = [name for name in drawn if name in weights]
        quota = quotas([weights[name] for name in names])
        windows = counts(steps * (step_tokens // s.seq_len), quota)
        sources = tuple(
            StageSource(name, q, drawn[name], n)
            for name, q, n in zip(names, quota, windows, strict=True)
        )
        for source in sources:
            drawn[source.name] += source.windows * s.seq_len
        stages.append(
            StagePlan(
                index=i,
                seq_len=s.seq_len,
                tokens=s.tokens,
                steps=steps,
                first_step=step,
                region_start=region,
                tokens_per_step=step_tokens,
                global_batch=step_tokens // s.seq_len,
                micro_batch=recipe.micro_batch_tokens // s.seq_len,
                grad_accum=step_tokens // per_rank_micro_tokens,
                alibi_scale=s.alibi_scale,
                sources=sources,
            )
        )
        step, region = step + steps, region + s.tokens
    return Plan(
        world_size=world_size,
        total_steps=step,
        total_tokens=region,
        n_params=count_parameters(recipe.model),
        stages=tuple(stages),
    )


def source_names(recipe: Recipe) -> list[str]:
    """The token folders' names, in the recipe's order ("data" for a single --data folder)."""
    return [source.name for source in recipe.data] if recipe.data else ["data"]


def lr_multiplier(
    tokens: int, schedule: ScheduleConfig, peak_lr: float, total_tokens: int
) -> float:
    """The factor on every parameter group's base rate after `tokens` tokens: linear warmup from
    0, then linear or cosine decay to end_lr / peak_lr at the end of the run (seeds-spec 1.4)."""
    if tokens < schedule.warmup_tokens:
        return tokens / schedule.warmup_tokens
    end = schedule.end_lr / peak_lr
    span = max(total_tokens - schedule.warmup_tokens, 1)
    progress = min((tokens - schedule.warmup_tokens) / span, 1.0)
    if schedule.decay == "cosine":
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1 - (1 - end) * progress


def deepspeed_config(recipe: Recipe, plan: Plan) -> dict:
    """The DeepSpeed config of a run. The micro-batch size here is the first stage's; later
    stages pass fewer, longer sequences per micro-step, which DeepSpeed does not need to know."""
    return {
        "train_micro_batch_size_per_gpu": plan.stages[0].micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        # Without ZeRO the clip is lmpipe's, by a norm summed in float64 (guard.plain_step).
        "gradient_clipping": recipe.optimizer.grad_clip if recipe.zero_stage else 0.0,
        # The guard (guard.py) relies on DeepSpeed skipping a bf16 step whose gradient norm is not
        # finite: said here, since releases before 0.19.8 did not check by default.
        "bf16": {"enabled": recipe.precision == "bf16", "check_grad_overflow": True},
        # Gradients summed over dozens or hundreds of micro-steps (BTLM: 480 / world size) lose
        # precision in bf16; DeepSpeed otherwise accumulates in the model's dtype. (DeepSpeed
        # 0.19.8 refuses fp32 accumulation of a bf16 model without ZeRO.)
        "data_types": {
            "grad_accum_dtype": "fp32" if recipe.precision == "bf16" and recipe.zero_stage else None
        },
        "zero_optimization": {"stage": recipe.zero_stage},
        "steps_per_print": 10**9,  # lmpipe logs its own metrics
        "wall_clock_breakdown": False,
    }


def plan_summary(recipe: Recipe, plan: Plan) -> dict:
    return {
        "world_size": plan.world_size,
        "parameters": plan.n_params,
        "tokens_per_step": recipe.tokens_per_step,
        "total_tokens": plan.total_tokens,
        "total_steps": plan.total_steps,
        "grad_accum": plan.grad_accum,
        "flops": training_flops(recipe, plan),
        "stages": [asdict(s) for s in plan.stages],
    }


def flops_per_token(recipe: Recipe, seq_len: int, n_params: int) -> float:
    """Training FLOPs a token: 6 N (forward and backward through every weight) plus attention's
    12 L T d (q.k and the weighted sum of v over T positions, forward and backward), the formula
    of the PaLM paper's appendix B that MFU figures use."""
    model = recipe.model
    return 6 * n_params + 12 * model.n_layers * seq_len * model.d_model


def model_flops_per_token(recipe: Recipe, seq_len: int, n_params: int) -> float:
    """MFU's model FLOPs a token: `flops_per_token` over the weights a token's matmuls use, i.e.
    without learned position embeddings (a table lookup; the token embedding counts once, as the
    tied unembedding's matmul), as nanoGPT's MFU counts. Counted, Cerebras-GPT 111M's 2,048
    learned positions would lift its MFU by 1.1% at 2,048 tokens. `training_flops` (the dry-run,
    `lmpipe recipes`, plan.json, the scaling fits) counts every parameter, positions too."""
    model = recipe.model
    positions = model.n_positions * model.d_model if model.position == "learned" else 0
    return flops_per_token(recipe, seq_len, n_params - positions)


def training_flops(recipe: Recipe, plan: Plan) -> float:
    return sum(s.tokens * flops_per_token(recipe, s.seq_len, plan.n_params) for s in plan.stages)


def print_plan(recipe: Recipe, world_size: int = 1) -> Plan:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    plan = make_plan(recipe, world_size)
    console = Console()
    console.print(recipe_yaml(recipe), markup=False, highlight=False)
    model = recipe.model
    console.print(
        f"parameters {plan.n_params:,} ({plan.n_params / 1e9:.3f}B); {plan.total_steps:,} steps, "
        f"{plan.total_tokens:,} tokens ({plan.total_tokens / plan.n_params:.3g} a parameter), "
        f"{training_flops(recipe, plan):.3g} FLOPs; world size {world_size}"
    )
    console.print(f"model: {model.position} positions, {model.mlp} MLP, {parametrisation(recipe)}")
    table = Table(title="stages", box=box.SIMPLE_HEAD)
    columns = (
        "stage",
        "seq_len",
        "tokens",
        "steps",
        "first\nstep",
        "tokens\n/step",
        "sequences\n/step",
        "micro-batch\n/rank",
        "grad\naccum",
        "alibi\nscale",
    )
    for col in columns:
        table.add_column(col, justify="right", no_wrap=True)
    for s in plan.stages:
        table.add_row(
            str(s.index),
            f"{s.seq_len:,}",
            f"{s.tokens:,}",
            f"{s.steps:,}",
            f"{s.first_step:,}",
            f"{s.tokens_per_step:,}",
            f"{s.global_batch:,}",
            str(s.micro_batch),
            str(s.grad_accum),
            f"{s.alibi_scale:g}",
        )
    print_table(console, table)
    return plan


def dry_run(
    recipe: Recipe,
    data: Path | list[DataSource] | None = None,
    world_size: int | None = None,
    gpu_memory: float | None = None,
) -> Plan:
    """`lmpipe train --dry-run`: the resolved recipe, its plan for `world_size` ranks (default:
    the launcher's WORLD_SIZE, or 1), what each stage draws from each source and the memory per
    GPU, with a warning when it exceeds `gpu_memory` GiB (default: this machine's GPU, if any).
    `data` (as `train` takes it) is optional here: without any, the data table has no epochs.
    Trains nothing; returns the plan."""
    # data.py and memory.py build on this module's Plan, so they are imported here, not above.
    from lmpipe.train.data import print_data_plan, with_data
    from lmpipe.train.memory import local_gpu_memory, print_memory

    if data is not None or recipe.data:
        recipe = with_data(recipe, data)
    plan = print_plan(recipe, world_size or launch_world_size())
    print_data_plan(recipe, plan)
    print_memory(recipe, plan, gpu_memory or local_gpu_memory())
    return plan


def parametrisation(recipe: Recipe) -> str:
    """muP's derived numbers in a line (or SP's init), as the run will use them."""
    model, lr = recipe.model, recipe.optimizer.lr
    mup = model.mup
    if mup is None:
        std = model.init_std or model.SP_INIT_STD
        return f"standard parametrisation: init std {std:g}, one LR {lr:g}"
    m_d = model.d_model / mup.d_model_base
    m_rho = model.density if mup.sparse_correction else 1.0
    return (
        f"muP: m_d = {m_d:g}, m_ffn = {model.d_ff / mup.d_ff_base:g}"
        + (f", m_rho = {m_rho:g}" if m_rho < 1 else "")
        + (" (density not corrected for)" if model.density < 1 and m_rho == 1 else "")
        + f"; LR {lr:.4g} (embeddings, norms, biases), {lr / (m_d * m_rho):.4g} (hidden); "
        f"init std {mup.sigma_base:g} (embeddings), {mup.sigma_base / math.sqrt(m_d * m_rho):.4g} "
        f"(hidden); logits x {mup.alpha_out / m_d:.4g}, embeddings x {mup.alpha_in:g}"
    )


def print_recipes() -> list[dict]:
    """The shipped recipes in a table (and as rows): shape, parameters, tokens, FLOPs."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from lmpipe.train.recipe import load_recipe, shipped_recipes

    rows: list[dict[str, Any]] = []
    for name in shipped_recipes():
        recipe = load_recipe(name)
        plan = make_plan(recipe)
        m = recipe.model
        rows.append(
            {
                "recipe": name,
                "model": f"{m.n_layers} x {m.d_model}, {m.position}, {m.mlp}, "
                + ("SP" if m.mup is None else "muP")
                + (f", density {m.density:g}" if m.density < 1 else ""),
                "parameters": plan.n_params,
                "tokens": plan.total_tokens,
                "flops": training_flops(recipe, plan),
                "tokens_per_parameter": plan.total_tokens / plan.n_params,
                "seq_len": " -> ".join(f"{s.seq_len:,}" for s in plan.stages),
            }
        )
    table = Table(title="lmpipe recipes", box=box.SIMPLE_HEAD)
    for col in ("recipe", "model", "parameters", "tokens", "FLOPs", "tokens\n/param", "seq_len"):
        table.add_column(
            col, justify="left" if col in ("recipe", "model") else "right", no_wrap=True
        )
    for r in rows:
        table.add_row(
            r["recipe"], r["model"], f"{r['parameters']:,}", f"{r['tokens']:.3g}",
            f"{r['flops']:.2g}", f"{r['tokens_per_parameter']:.3g}", r["seq_len"],
        )  # fmt: skip
    print_table(Console(), table)
    return rows
