"""What a recipe means for a given number of ranks: steps, batches, accumulation, the LR schedule
and the DeepSpeed config. All derived, never written by hand; `--dry-run` prints it and every run
saves it.

Tokens per step are the same in every stage, so when the sequence length grows 4x the global batch
shrinks 4x in sequences, and with a fixed `micro_batch_tokens` the gradient accumulation stays the
same: DeepSpeed's config does not change at a stage switch, only the loader's window length and
the micro-batch's number of sequences do.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.train.recipe import Recipe, ScheduleConfig, recipe_yaml


@dataclass(frozen=True)
class StagePlan:
    index: int
    seq_len: int
    tokens: int
    steps: int
    first_step: int  # global step at which the stage begins
    region_start: int  # stream token where the stage's data begins (tokens of earlier stages)
    global_batch: int  # sequences per optimizer step, all ranks
    micro_batch: int  # sequences per rank per forward


@dataclass(frozen=True)
class Plan:
    world_size: int
    grad_accum: int
    total_steps: int
    total_tokens: int
    n_params: int
    stages: tuple[StagePlan, ...]

    def stage_at(self, step: int) -> StagePlan:
        for stage in self.stages:
            if step < stage.first_step + stage.steps:
                return stage
        return self.stages[-1]


def make_plan(recipe: Recipe, world_size: int = 1) -> Plan:
    from lmpipe.train.model import count_parameters  # torch import, only when planning

    per_rank_micro_tokens = recipe.micro_batch_tokens * world_size
    if recipe.tokens_per_step % per_rank_micro_tokens:
        raise LmpipeError(
            f"tokens_per_step ({recipe.tokens_per_step}) is not a multiple of micro_batch_tokens x "
            f"world size ({recipe.micro_batch_tokens} x {world_size}); change either with --set"
        )
    stages, step, region = [], 0, 0
    for i, s in enumerate(recipe.stages):
        steps = s.tokens // recipe.tokens_per_step
        stages.append(
            StagePlan(
                index=i,
                seq_len=s.seq_len,
                tokens=s.tokens,
                steps=steps,
                first_step=step,
                region_start=region,
                global_batch=recipe.tokens_per_step // s.seq_len,
                micro_batch=recipe.micro_batch_tokens // s.seq_len,
            )
        )
        step, region = step + steps, region + s.tokens
    return Plan(
        world_size=world_size,
        grad_accum=recipe.tokens_per_step // per_rank_micro_tokens,
        total_steps=step,
        total_tokens=region,
        n_params=count_parameters(recipe.model),
        stages=tuple(stages),
    )


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
        "gradient_clipping": recipe.optimizer.grad_clip,
        "bf16": {"enabled": recipe.precision == "bf16"},
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
        "stages": [asdict(s) for s in plan.stages],
    }


def print_plan(recipe: Recipe, world_size: int = 1) -> Plan:
    from rich.console import Console
    from rich.table import Table

    plan = make_plan(recipe, world_size)
    console = Console()
    console.print(recipe_yaml(recipe), markup=False, highlight=False)
    mup = recipe.model.mup
    console.print(
        f"parameters {plan.n_params:,} ({plan.n_params / 1e9:.3f}B); tokens per step "
        f"{recipe.tokens_per_step:,}; {plan.total_steps:,} steps, {plan.total_tokens:,} tokens; "
        f"gradient accumulation {plan.grad_accum} at world size {world_size}"
    )
    console.print(
        f"muP: m_d = {recipe.model.d_model / mup.d_model_base:g}, m_ffn = {recipe.model.d_ff / mup.d_ff_base:g}, "
        f"hidden LR {recipe.optimizer.lr * mup.d_model_base / recipe.model.d_model:.4g}, "
        f"logit multiplier {mup.alpha_out * mup.d_model_base / recipe.model.d_model:.4g}"
    )
    table = Table(title="stages")
    for col in (
        "stage",
        "seq_len",
        "tokens",
        "steps",
        "first step",
        "sequences/step",
        "micro-batch/rank",
    ):
        table.add_column(col, justify="right")
    for s in plan.stages:
        table.add_row(
            str(s.index),
            f"{s.seq_len:,}",
            f"{s.tokens:,}",
            f"{s.steps:,}",
            f"{s.first_step:,}",
            f"{s.global_batch:,}",
            str(s.micro_batch),
        )
    console.print(table)
    return plan
