"""`lmpipe train --dry-run`'s memory estimate (lmpipe.train.memory): its numbers for a known
shape worked out by hand, the warning exactly when the peak exceeds --gpu-memory, and the model
states against what a real DeepSpeed engine holds on the CPU."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import is_fake
from typer.testing import CliRunner

from lmpipe.cli.app import app
from lmpipe.train.memory import GIB, estimate_memory, print_memory
from lmpipe.train.plan import make_plan
from lmpipe.train.recipe import load_recipe

# d 64, d_ff 170, 4 heads, 2 layers, V 50,257: 3,316,456 parameters (test_model counts them)
SHAPE = ["micro_batch_tokens=1024", "tokens_per_step=4096"]


def test_estimate_of_a_known_shape_by_hand():
    recipe = load_recipe("tiny", [*SHAPE, "precision=bf16", "zero_stage=2"])
    memory = estimate_memory(recipe, make_plan(recipe, world_size=2))
    n = 3_316_456
    assert make_plan(recipe).n_params == n
    assert (memory.weights, memory.gradients, memory.optimizer) == (2 * n, 4 * n // 2, 12 * n // 2)
    assert memory.zero3_buffers == 0
    stage0, stage1 = memory.stages  # 16 x 64 and 4 x 256: 1,024 tokens each
    assert (stage0.micro_batch, stage1.micro_batch) == (16, 4)
    block = 1024 * (2 * (9 * 64 + 4 * 170) + 4 * 4)  # bf16 SwiGLU block + the fp32 lse of 4 heads
    assert stage0.activations == stage1.activations == 2 * block
    # ln_f's input, the chunked loss's gradients of the hidden states and of the embedding, its
    # fp32 embedding gradient, the embedding padded to 50,304 rows in bf16 and one 1,024-token
    # chunk of fp32 logits and two bf16 copies, 50,304 wide
    V, P, d = 50257, 50304, 64
    assert (
        stage0.head
        == 2 * 1024 * d + 2 * 1024 * d + 2 * V * d + 4 * V * d + 2 * P * d + 8 * 1024 * P
    )
    assert memory.peak == memory.total(stage0) == 2 * n + 2 * n + 6 * n + 2 * block + stage0.head

    # checkpointing every block: each keeps its input, one is recomputed at a time; plain loss
    # keeps [n, V] logits in bf16 and twice in fp32; sdpa keeps ALiBi's [H, T, T] bias
    recipe = load_recipe(
        "tiny",
        [
            *SHAPE,
            "precision=bf16",
            "model.activation_checkpointing=full",
            "model.loss_impl=plain",
            "model.attn_impl=sdpa",
        ],
    )
    stage0, stage1 = estimate_memory(recipe, make_plan(recipe)).stages
    kept = 2 * 1024 * d
    assert stage0.activations == 2 * kept + block + 2 * 4 * 64 * 64
    assert stage1.activations == 2 * kept + block + 2 * 4 * 256 * 256
    assert stage0.head == 2 * 1024 * d + 2 * 1024 * d + 10 * 1024 * V
    # every_2 of 3 layers: blocks 0 and 2 keep their inputs, block 1 everything
    recipe = load_recipe(
        "tiny", [*SHAPE, "model.n_layers=3", "model.activation_checkpointing=every_2"]
    )
    block32 = 1024 * (4 * (9 * 64 + 4 * 170) + 4 * 4)  # fp32 (the tiny recipe's precision)
    got = estimate_memory(recipe, make_plan(recipe)).stages[0].activations
    assert got == 2 * 4 * 1024 * d + block32 + block32


def test_zero_stages_partition_by_world_size():
    n = 2_646_255_744  # BTLM-3B
    for stage, want in [(1, (2, 6, 12 / 8)), (2, (2, 4 / 8, 12 / 8)), (3, (2 / 8, 4 / 8, 12 / 8))]:
        recipe = load_recipe("btlm3b", [f"zero_stage={stage}"])
        memory = estimate_memory(recipe, make_plan(recipe, world_size=8))
        assert make_plan(recipe).n_params == n
        got = (memory.weights, memory.gradients, memory.optimizer)
        assert got == pytest.approx(tuple(n * b for b in want), abs=1)
    recipe = load_recipe("btlm3b", ["zero_stage=0", "precision=fp32"])  # plain Adam: 4 + 4 + 8
    memory = estimate_memory(recipe, make_plan(recipe, world_size=8))
    assert (memory.weights, memory.gradients, memory.optimizer) == (4 * n, 4 * n, 8 * n)


def test_the_warning_appears_exactly_when_the_peak_exceeds_the_gpu(capsys):
    recipe = load_recipe("btlm3b")
    plan = make_plan(recipe)
    peak = estimate_memory(recipe, plan).peak / GIB
    assert 60 < peak < 80  # BTLM-3B on one GPU without checkpointing: near an H100's 80 GiB
    print_memory(recipe, plan, gpu_memory=peak * 1.001)
    out = capsys.readouterr()
    assert "warning" not in out.err and "fits" in out.out
    print_memory(recipe, plan, gpu_memory=peak * 0.999)
    assert "warning: the run needs" in capsys.readouterr().err
    print_memory(recipe, plan, gpu_memory=None)
    out = capsys.readouterr()
    assert "warning" not in out.err and "fits" not in out.out


def test_dry_run_prints_the_memory_table_for_a_planned_world_size():
    args = ["train", "--recipe", "btlm3b", "--dry-run", "--set", "zero_stage=3"]
    one = CliRunner().invoke(app, [*args, "--gpu-memory", "40"])
    assert one.exit_code == 0, one.output
    assert "memory per GPU" in one.output and "warning: the run needs" in one.output
    eight = CliRunner().invoke(app, [*args, "--gpu-memory", "40", "--world-size", "8"])
    assert eight.exit_code == 0, eight.output
    assert "world size 8" in eight.output and "warning" not in eight.output
    run = CliRunner().invoke(app, ["train", "--recipe", "tiny", "--world-size", "8"])
    assert run.exit_code == 2 and "go with --dry-run" in run.output


def live_storages() -> dict[int, torch.UntypedStorage]:
    """Every CPU tensor's storage the interpreter can reach, by address (torch.compile's caches
    keep fake tensors, which have no storage, from tests that ran before). Holding the result
    keeps those storages alive: a tensor of an earlier test freed meanwhile would let a new one
    take its address and go uncounted."""
    gc.collect()
    found = {}
    with warnings.catch_warnings():  # isinstance() on torch.distributed's deprecated objects
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for tensor in tensors:
        if tensor.device.type == "cpu" and not is_fake(tensor):
            storage = tensor.untyped_storage()
            found[storage.data_ptr()] = storage
    return found


@pytest.mark.parametrize(
    "zero_stage, precision", [(0, "fp32"), (1, "bf16"), (2, "bf16"), (3, "bf16"), (3, "fp32")]
)
def test_model_states_match_a_deepspeed_engine(zero_stage, precision):
    """A DeepSpeed engine on the CPU with lmpipe's config, after a backward pass and before the
    optimizer step of its second step (gradients and Adam's states both there): every tensor it
    holds is the model states the estimate counts, within 3% (ZeRO-3's reduce bucket, 5e8
    elements allocated up front, aside: it would swamp a small model)."""
    import deepspeed

    from lmpipe.train.build import build_model
    from lmpipe.train.launch import init_distributed, launch_environment
    from lmpipe.train.memory import DEEPSPEED_REDUCE_BUCKET
    from lmpipe.train.plan import deepspeed_config

    recipe = load_recipe(
        "tiny",
        [
            "model.n_layers=4",
            "model.d_model=256",
            "model.d_ff=682",
            "model.mup.d_model_base=256",
            "model.mup.d_ff_base=682",
            "model.vocab_size=4096",
            "tokens_per_step=512",
            "micro_batch_tokens=256",
            f"zero_stage={zero_stage}",
            f"precision={precision}",
        ],
    )
    with launch_environment():
        init_distributed()
        plan = make_plan(recipe)
        config = deepspeed_config(recipe, plan)
        before = live_storages()
        model = build_model(recipe, config)
        optimizer = torch.optim.AdamW(model.param_groups(1e-3, 0.1), lr=1e-3)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        del model, optimizer
        tokens = torch.randint(0, 4096, (4, 65))
        for step in range(2):
            for micro in range(2):
                engine.set_gradient_accumulation_boundary(micro == 1)
                loss = engine(tokens[:, :-1], tokens[:, 1:])[1]
                engine.backward(loss)
                del loss
                if step == 1 and micro == 1:
                    held = sum(
                        st.nbytes() for ptr, st in live_storages().items() if ptr not in before
                    )
                engine.step()
    memory = estimate_memory(recipe, plan)
    if zero_stage == 3:  # the reduce bucket (gathered parameters are freed between passes)
        held -= (2 if precision == "bf16" else 4) * DEEPSPEED_REDUCE_BUCKET
    assert held == pytest.approx(memory.weights + memory.gradients + memory.optimizer, rel=0.03)


@pytest.mark.parametrize("mlp, d_ff", [("swiglu", 170), ("gelu", 256)])
@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_activations_match_the_tensors_a_forward_pass_saves(mlp, d_ff, checkpointing):
    """The bytes every tensor the blocks and ln_f save for the backward pass hold (weights aside),
    measured with autograd's saved-tensor hooks on a bf16 model on the CPU, against the estimate.
    Learned positions: SDPA's causal kernel on the CPU keeps what a flash kernel keeps on a GPU
    (q, k, v, the output and the fp32 log-sum-exp, no [T, T] scores). The estimate counts one
    copy of the attention output more than PyTorch makes here, and leaves out LayerNorm's fp32
    statistics and the token ids: within 6%."""
    from lmpipe.train.memory import activation_bytes, block_activation_bytes
    from lmpipe.train.model import GPT

    recipe = load_recipe(
        "tiny",
        [
            "model.position=learned",
            "model.n_positions=256",
            f"model.mlp={mlp}",
            f"model.d_ff={d_ff}",
            f"model.mup.d_ff_base={d_ff}",
            "model.vocab_size=512",
            "precision=bf16",
            f"model.activation_checkpointing={checkpointing}",
        ],
    )
    from tests.train.test_model_speed import saved_bytes

    model = GPT(recipe.model).bfloat16()
    B, T = 4, 256
    idx = torch.randint(0, 512, (B, T))
    saved = saved_bytes(lambda: model.hidden_states(idx), model.parameters())
    want = activation_bytes(recipe, T, B) + 2 * B * T * 64  # and ln_f's input
    if checkpointing == "full":  # the recomputed block exists only during the backward pass
        want -= block_activation_bytes(recipe, T, B)
    assert saved == pytest.approx(want, rel=0.06)


def test_host_memory_to_build_and_export_the_model(capsys):
    """ZeRO-1 builds the whole fp32 model on every rank, ZeRO-3 one submodule at a time (in bf16);
    both add
    an fp32 copy and two masks of the largest parameter (GPT-2's embedding) while initialising it;
    rank 0 gathers the fp32 weights to write them."""
    from lmpipe.train.model import block_parameters

    btlm = load_recipe("btlm3b")
    n, embedding = make_plan(btlm).n_params, 50257 * 2560
    memory = estimate_memory(btlm, make_plan(btlm, world_size=8))
    assert memory.host_build == 4 * n + 6 * embedding and memory.host_export == 4 * n
    big = load_recipe("cerebras-gpt-13b")
    n13 = make_plan(big).n_params
    memory = estimate_memory(big, make_plan(big, world_size=8))
    block = block_parameters(big.model)  # 315M: more than the embedding's 257M
    assert big.zero_stage == 3 and memory.host_build == 2 * block + 6 * 50257 * 5120
    assert memory.host_build < 4 * n13 / 20 and memory.host_export == 4 * n13  # 2.0 vs 47.9 GiB
    print_memory(big, make_plan(big, world_size=8), None)
    out = " ".join(capsys.readouterr().out.split())
    assert "host memory: ~2.0 GiB per rank to build the model (one submodule at a time;" in out
    assert "~47.9 GiB on rank 0 to write the final weights" in out
