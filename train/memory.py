"""Memory per GPU of a training run, estimated before it starts (`lmpipe train --dry-run`).

Model states, per parameter and rank (Psi parameters, N ranks): the mixed-precision accounting of
the ZeRO paper (Rajbhandari et al. 2020, section 3.1: 2 + 2 + 12 bytes, bf16 weights and
gradients, an fp32 master copy and Adam's m and v), partitioned as each ZeRO stage partitions it,
with the gradients as lmpipe's DeepSpeed config keeps them: accumulated in fp32 (`plan.
deepspeed_config`, 4 bytes), and under ZeRO-1 whole on every rank (DeepSpeed 0.19.8's
BF16_Optimizer keeps an fp32 gradient buffer of the whole model, and the bf16 gradients of the
micro-step until the optimizer step; ZeRO-2 and 3 partition them). The peak, just before an
optimizer step (tests/train/test_memory.py measures it on a DeepSpeed engine):

                 bf16 weights  gradients  optimizer     fp32 weights  gradients  optimizer
      ZeRO-1          2          2 + 4      12 / N            4            4        12 / N
      ZeRO-2          2          4 / N      12 / N            4          4 / N      12 / N
      ZeRO-3        2 / N        4 / N      12 / N          4 / N        4 / N      12 / N
      ZeRO-0         (refused: bf16 needs ZeRO)               4            4           8

(an fp32 run under ZeRO still gets a separate fp32 copy of its partition: 12 bytes of optimizer,
measured). ZeRO-3 also holds, whatever N, parameters gathered for the layer at work (the tied
embedding and two blocks: one running, one prefetched) and its reduce bucket
(`reduce_bucket_size`, 5e8 elements by default, allocated up front).

Activations, per micro-batch of n = micro_batch x seq_len tokens, in the training dtype (a bytes:
2 in bf16), counted from what each block saves for its backward pass as lmpipe's model computes
it (Korthikanti et al. 2022, "Reducing Activation Recomputation", section 4.1, without dropout
masks and, with FlexAttention / flash attention, without the [T, T] scores):
  - attention: ln_1's input, c_attn's input, q, k, v, the kernel's output and c_proj's input:
    7 d per token, plus the kernel's fp32 log-sum-exp (4 bytes per head and token);
  - MLP: ln_2's input and the MLP's input, 2 d; SwiGLU 4 d_ff (both projections, SiLU's output,
    their product), GELU 2 d_ff (its input and output);
  so a block keeps n (a (9 d + 4 d_ff) + 4 H) bytes with SwiGLU (GELU d_ff = 4 d: 34 n d bytes,
  Korthikanti's 34 s b h). `attn_impl: sdpa` with ALiBi also keeps each block's [H, T, T] bias.
  A checkpointed block (`activation_checkpointing`) keeps only its input (n d a bytes) and, while
  its backward pass runs, its recomputed activations: one block's worth more.
  After the blocks, ln_f's input (n d a) and the loss: chunked (`loss_impl`, CUDA's default)
  keeps the gradients it formed (n d a for the hidden states, V d a for the embedding) and, while
  it runs, an fp32 [V, d] sum, the embedding padded to P rows (P d a, P = V up to a multiple of
  128) and one chunk's logits (c P (4 + 2 a), c = `loss_chunk_tokens`); the plain loss keeps
  [n, V] logits in the training dtype and twice in fp32 (a + 8 bytes each).
tests/train/test_memory.py checks the blocks' count against the tensors a bf16 forward pass on the
CPU saves (within 6%: one copy of the attention output fewer there, LayerNorm's statistics and
the token ids not counted) and the model states against a DeepSpeed engine's tensors.
Stages hold the same tokens per micro-batch; a longer sequence costs more only where the [T, T]
bias grows, and the peak is the largest stage.

Not counted: the CUDA context (~0.5 GiB), PyTorch's allocator's fragmentation, DeepSpeed's
communication buckets of ZeRO-1/2, torch.compile's workspaces. Leave ~10% of the card free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmpipe.train.plan import Plan
from lmpipe.train.recipe import Recipe

GIB = 2**30
DEEPSPEED_REDUCE_BUCKET = 500_000_000  # zero_optimization.reduce_bucket_size's default, elements


@dataclass(frozen=True)
class StageMemory:
    index: int
    seq_len: int
    micro_batch: int
    activations: int  # bytes the blocks keep for the backward pass
    head: int  # bytes ln_f and the loss keep (and the loss's working memory)


@dataclass(frozen=True)
class MemoryEstimate:
    world_size: int
    zero_stage: int
    weights: int
    gradients: int
    optimizer: int
    zero3_buffers: int  # gathered parameters and the reduce bucket (ZeRO-3 only)
    stages: tuple[StageMemory, ...]
    host_build: int  # host memory a rank takes to build and initialise the model
    host_export: int  # host memory rank 0 takes to write the final weights

    @property
    def model_states(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.zero3_buffers

    def total(self, stage: StageMemory) -> int:
        return self.model_states + stage.activations + stage.head

    @property
    def peak(self) -> int:
        return max(self.total(stage) for stage in self.stages)


def model_state_bytes(recipe: Recipe, n_params: int, world_size: int) -> tuple[int, int, int]:
    """Bytes of weights, gradients and optimizer states on one rank (the table above)."""
    zero, N = recipe.zero_stage, world_size
    weight = 2 if recipe.precision == "bf16" else 4
    weights = n_params * weight / (N if zero == 3 else 1)
    gradients = n_params * 4 / (N if zero >= 2 else 1)
    if zero == 1 and recipe.precision == "bf16":  # BF16_Optimizer: the bf16 gradients as well
        gradients += n_params * 2
    optimizer = n_params * 12 / N if zero >= 1 else n_params * 8
    return math.ceil(weights), math.ceil(gradients), math.ceil(optimizer)


def zero3_buffer_bytes(recipe: Recipe) -> int:
    """ZeRO-3's memory beyond the partitions: the tied embedding and two blocks gathered, and the
    reduce bucket."""
    from lmpipe.train.model import block_parameters  # torch import, only when planning

    model = recipe.model
    weight = 2 if recipe.precision == "bf16" else 4
    embedding = model.vocab_size * model.d_model
    return weight * (embedding + 2 * block_parameters(model) + DEEPSPEED_REDUCE_BUCKET)


def host_build_bytes(recipe: Recipe, n_params: int) -> int:
    """Host memory one rank takes to build and initialise the model (`build.py`): ZeRO-0/1/2 make
    the whole model in fp32 on every rank (a node's ranks each hold one), ZeRO-3 one submodule at
    a time in the training dtype. Initialising a parameter adds an fp32 copy of it and two masks
    of the values to draw again (6 bytes a value, 6.07 measured; `model.truncated_normal_`): the
    largest parameter counts."""
    from lmpipe.train.model import block_parameters  # torch import, only when planning

    model = recipe.model
    embedding = model.vocab_size * model.d_model
    largest = max(embedding, model.d_model * max(3 * model.d_model, model.d_ff))
    if recipe.zero_stage < 3:
        return 4 * n_params + 6 * largest
    weight = 2 if recipe.precision == "bf16" else 4
    return weight * max(embedding, block_parameters(model)) + 6 * largest


def block_activation_bytes(recipe: Recipe, seq_len: int, micro_batch: int) -> int:
    """What one block keeps for its backward pass (without checkpointing), in bytes."""
    model = recipe.model
    a, n = activation_size(recipe), seq_len * micro_batch
    per_token = a * (9 * model.d_model + (4 if model.mlp == "swiglu" else 2) * model.d_ff)
    per_token += 4 * model.n_heads  # the attention kernel's fp32 log-sum-exp
    bias = 0
    if model.attn_impl == "sdpa" and model.position == "alibi":  # auto is FlexAttention on GPUs
        bias = a * model.n_heads * seq_len * seq_len
    return n * per_token + bias


def activation_bytes(recipe: Recipe, seq_len: int, micro_batch: int) -> int:
    """What all blocks keep, checkpointing as the recipe says (blocks 0, N, 2N, ... keep only their
    input, and one of them is recomputed at a time in the backward pass)."""
    model = recipe.model
    block = block_activation_bytes(recipe, seq_len, micro_batch)
    every = model.checkpoint_every
    checkpointed = math.ceil(model.n_layers / every) if every else 0
    kept_input = activation_size(recipe) * seq_len * micro_batch * model.d_model
    recomputed = block if checkpointed else 0
    return (model.n_layers - checkpointed) * block + checkpointed * kept_input + recomputed


def head_bytes(recipe: Recipe, seq_len: int, micro_batch: int) -> int:
    """ln_f's input and the loss on a GPU (`loss_impl: auto` is the chunked loss there)."""
    model = recipe.model
    a, n, V, d = activation_size(recipe), seq_len * micro_batch, model.vocab_size, model.d_model
    if model.loss_impl == "plain":
        return a * n * d + a * n * d + (a + 8) * n * V  # ln_f's and the unembedding's inputs
    from lmpipe.train.loss import VOCAB_ALIGN  # torch import, only when planning

    chunk, P = min(model.loss_chunk_tokens, n), -(-V // VOCAB_ALIGN) * VOCAB_ALIGN
    return a * n * d + a * n * d + a * V * d + 4 * V * d + a * P * d + (4 + 2 * a) * chunk * P


def activation_size(recipe: Recipe) -> int:
    return 2 if recipe.precision == "bf16" else 4


def estimate_memory(recipe: Recipe, plan: Plan) -> MemoryEstimate:
    weights, gradients, optimizer = model_state_bytes(recipe, plan.n_params, plan.world_size)
    stages = tuple(
        StageMemory(
            index=s.index,
            seq_len=s.seq_len,
            micro_batch=s.micro_batch,
            activations=activation_bytes(recipe, s.seq_len, s.micro_batch),
            head=head_bytes(recipe, s.seq_len, s.micro_batch),
        )
        for s in plan.stages
    )
    return MemoryEstimate(
        world_size=plan.world_size,
        zero_stage=recipe.zero_stage,
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        zero3_buffers=zero3_buffer_bytes(recipe) if recipe.zero_stage == 3 else 0,
        stages=stages,
        host_build=host_build_bytes(recipe, plan.n_params),
        host_export=4 * plan.n_params,  # the fp32 weights, gathered (`loop.write_final_model`)
    )


def local_gpu_memory() -> float | None:
    """This machine's GPU memory in GiB, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GIB


def print_memory(recipe: Recipe, plan: Plan, gpu_memory: float | None) -> MemoryEstimate:
    """The estimate as a table, and a warning when the peak exceeds `gpu_memory` GiB."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from lmpipe.dataprep.report import print_table

    memory = estimate_memory(recipe, plan)
    table = Table(
        title=f"memory per GPU, GiB (ZeRO-{memory.zero_stage}, world size {memory.world_size}, "
        f"{recipe.precision}, activation checkpointing {recipe.model.activation_checkpointing})",
        box=box.SIMPLE_HEAD,
    )
    columns = (
        "stage",
        "seq_len",
        "micro-batch\n/rank",
        "weights",
        "gradients",
        "optimizer",
        "ZeRO-3\nbuffers",
        "activations",
        "ln_f +\nloss",
        "total",
    )
    for col in columns:
        table.add_column(col, justify="right", no_wrap=True)
    for s in memory.stages:
        table.add_row(
            str(s.index), f"{s.seq_len:,}", str(s.micro_batch),
            *(_gib(x) for x in (memory.weights, memory.gradients, memory.optimizer,
                                memory.zero3_buffers, s.activations, s.head, memory.total(s))),
        )  # fmt: skip
    console = Console()
    print_table(console, table)
    how = "one submodule at a time" if memory.zero_stage == 3 else "the whole fp32 model"
    console.print(
        f"host memory: ~{memory.host_build / GIB:.1f} GiB per rank to build the model ({how}; "
        f"a node's ranks each take it), ~{memory.host_export / GIB:.1f} GiB on rank 0 to write "
        "the final weights",
        highlight=False,
    )
    peak = memory.peak / GIB
    if gpu_memory is None:
        console.print(f"peak ~{peak:.1f} GiB per GPU (--gpu-memory GIB checks it against a card)")
    elif peak > gpu_memory:
        Console(stderr=True).print(
            f"[bold yellow]warning:[/] the run needs ~{peak:.1f} GiB per GPU at its peak, more "
            f"than the GPU's {gpu_memory:g} GiB: raise zero_stage or the world size, lower "
            "micro_batch_tokens, or set model.activation_checkpointing (full or every_N)",
            highlight=False,
        )
    else:
        tight = " (tight: the estimate omits ~10%)" if peak > 0.9 * gpu_memory else ""
        console.print(f"fits: ~{peak:.1f} of {gpu_memory:g} GiB per GPU at the peak{tight}")
    return memory


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"
