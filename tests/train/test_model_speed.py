"""How the model trains fast, never what it computes: the chunked loss, activation
checkpointing and compiled blocks give the plain model's loss and gradients."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.train.data import IGNORE
from lmpipe.train.loss import chunked_cross_entropy
from lmpipe.train.model import GPT
from lmpipe.train.recipe import ModelConfig, load_recipe, recipe_yaml
from tests.train.test_loop import SMALL as LOOP_SMALL
from tests.train.test_model import tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from loss_memory import peak_growth, saved_bytes  # noqa: E402  (the benchmark's own measures)

VARIANTS = {
    "alibi_swiglu_mup": {},
    "learned_gelu_sp": dict(position="learned", n_positions=64, mlp="gelu", d_ff=128, mup=None),
    "sparse_mup": dict(density=0.5),
}


def config(variant: str = "alibi_swiglu_mup", **overrides) -> ModelConfig:
    return tiny_config(**{**VARIANTS[variant], **overrides})


def batch(cfg: ModelConfig, B: int = 3, T: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and targets, the first targets of row 0 ignored (as heldout_loss pads)."""
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    targets = idx[:, 1:].clone()
    targets[0, :7] = IGNORE
    return idx[:, :-1], targets


def loss_and_grads(cfg: ModelConfig, precision: str = "fp32", steps: int = 1):
    """The loss and every parameter's gradient (float32) of one model built from seed 0.
    `bf16_autocast` runs under CPU autocast; `bf16_weights` holds the model in bf16, as
    DeepSpeed's bf16 mode does."""
    torch.manual_seed(0)
    model = GPT(cfg)
    if precision == "bf16_weights":
        model = model.to(torch.bfloat16)
    idx, targets = batch(cfg)
    with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16_autocast"):
        logits, loss = model(idx, targets)
    loss.backward()
    return logits, loss.item(), {n: p.grad.float() for n, p in model.named_parameters()}


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest elementwise difference, relative to b's largest element."""
    return ((a - b).abs().max() / b.abs().max()).item()


# --- the chunked loss ---------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16_autocast", "bf16_weights"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_chunked_loss_and_gradients_equal_the_plain_loss(variant, precision):
    # 60 tokens in chunks of 16: the last chunk is short, and row 0 starts with ignored targets
    plain_logits, plain_loss, plain = loss_and_grads(config(variant, loss_impl="plain"), precision)
    cfg = config(variant, loss_impl="chunked", loss_chunk_tokens=16)
    logits, loss, chunked = loss_and_grads(cfg, precision)
    assert plain_logits is not None and logits is None  # the chunked loss forms no logits
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert chunked.keys() == plain.keys()
    # fp32: the same sums in another order. bf16: softmax gradients rounded to bf16 from another
    # (equal) formula, and the embedding's gradient summed over chunks: within two bf16 roundings
    tolerance = 1e-5 if precision == "fp32" else 2**-7
    for name, grad in chunked.items():
        assert relative_difference(grad, plain[name]) <= tolerance, name


def test_chunked_loss_without_gradients_is_the_plain_loss():
    """Evaluation (heldout_loss): no gradients, chunks reduced to their loss only."""
    cfg = config()
    torch.manual_seed(0)
    model = GPT(cfg.model_copy(update={"loss_impl": "chunked", "loss_chunk_tokens": 7}))
    plain = GPT(cfg.model_copy(update={"loss_impl": "plain"}))
    plain.load_state_dict(model.state_dict())
    idx, targets = batch(cfg)
    with torch.no_grad():
        logits, loss = model(idx, targets)
        _, want = plain(idx, targets)
        full, _ = model(idx)  # without targets: the logits, as ever
    assert logits is None and full is not None and full.shape == (3, 20, cfg.vocab_size)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert loss.grad_fn is None


def test_chunked_gradients_scale_with_the_incoming_gradient():
    """DeepSpeed backpropagates loss / accumulation steps: the precomputed gradients scale."""
    cfg = config(loss_impl="chunked", loss_chunk_tokens=16)
    grads = []
    for scale in (1.0, 0.25):
        torch.manual_seed(0)
        model = GPT(cfg)
        _, loss = model(*batch(cfg))
        (loss * scale).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad * 0.25, rtol=1e-6, atol=1e-9)


def test_chunked_loss_keeps_no_vocabulary_wide_tensor():
    N, V, D = 512, 4096, 32
    x_ND = torch.randn(N, D, requires_grad=True)
    w_VD = torch.randn(V, D, requires_grad=True)
    target_N = torch.randint(0, V, (N,))
    plain = saved_bytes(lambda: F.cross_entropy(F.linear(x_ND, w_VD), target_N), [x_ND, w_VD])
    chunked = saved_bytes(lambda: chunked_cross_entropy(x_ND, w_VD, target_N, 128), [x_ND, w_VD])
    # plain: at least the [N, V] float32 log-softmax; chunked: only its gradients of x and w
    assert plain >= N * V * 4
    assert chunked == (N * D + V * D) * 4


def test_chunked_loss_multiplies_by_a_vocabulary_padded_to_128_and_masks_the_padding():
    """GPT-2's 50,257 rows become 50,304 for the matmuls (aligned GPU kernels); the padded
    logits take no probability: loss and gradients equal the plain ones, and the gradient of the
    weight keeps its [V, D] shape."""
    from lmpipe.train.loss import ChunkedCrossEntropy, softmax_step

    N, V, D = 96, 50257, 16
    g = torch.Generator().manual_seed(0)
    x_ND = torch.randn(N, D, generator=g, requires_grad=True)
    w_VD = torch.randn(V, D, generator=g, requires_grad=True)
    target_N = torch.randint(0, V, (N,), generator=g)
    widths = []

    def step(logits, *args):
        widths.append(logits.shape[1])
        return softmax_step(logits, *args)

    ChunkedCrossEntropy.apply(x_ND, w_VD, target_N, 32, step).backward()
    assert widths == [50304] * 3 and w_VD.grad.shape == (V, D)
    got = (x_ND.grad.clone(), w_VD.grad.clone())
    x_ND.grad = w_VD.grad = None
    loss = F.cross_entropy(F.linear(x_ND, w_VD), target_N)
    loss.backward()
    assert relative_difference(got[0], x_ND.grad) < 1e-5
    assert relative_difference(got[1], w_VD.grad) < 1e-5


# --- activation checkpointing --------------------------------------------------------------


def block_calls(model: GPT) -> list[int]:
    """Forward calls of each block, counted as they start (a recomputation calls the block again,
    and stops once it has what the backward pass needs)."""
    calls = [0] * len(model.h)
    for i, block in enumerate(model.h):
        block.register_forward_pre_hook(lambda m, args, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize(
    ("setting", "recomputed"),
    [("none", []), ("full", [0, 1, 2, 3]), ("every_2", [0, 2]), ("every_3", [0, 3])],
)
def test_activation_checkpointing_recomputes_the_chosen_blocks_with_identical_gradients(
    setting, recomputed
):
    cfg = config(n_layers=4)
    _, want_loss, want = loss_and_grads(cfg)
    torch.manual_seed(0)
    model = GPT(cfg.model_copy(update={"activation_checkpointing": setting}))
    calls = block_calls(model)
    _, loss = model(*batch(cfg))
    loss.backward()
    assert calls == [2 if i in recomputed else 1 for i in range(4)]
    assert loss.item() == want_loss
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, want[name]), name
    # without gradients (evaluation) nothing is checkpointed: each block runs once
    calls[:] = [0] * 4
    with torch.no_grad():
        model(*batch(cfg))
    assert calls == [1] * 4


def test_full_checkpointing_keeps_less_for_the_backward_pass():
    cfg = config(n_layers=4, d_model=64, d_ff=170)
    idx, targets = batch(cfg, B=2, T=64)
    kept = {}
    for setting in ("none", "every_2", "full"):
        torch.manual_seed(0)
        model = GPT(cfg.model_copy(update={"activation_checkpointing": setting}))
        kept[setting] = saved_bytes(lambda m=model: m(idx, targets), model.parameters())
    assert kept["full"] < kept["every_2"] < kept["none"]
    assert kept["full"] < kept["none"] / 3, kept


def test_activation_checkpointing_setting_is_checked():
    assert (
        load_recipe("tiny", ["model.activation_checkpointing=every_4"]).model.checkpoint_every == 4
    )
    assert load_recipe("tiny", ["model.activation_checkpointing=full"]).model.checkpoint_every == 1
    assert load_recipe("tiny").model.checkpoint_every == 0
    for bad in ("every_0", "sometimes", "every_2x"):
        with pytest.raises(LmpipeError, match="model.activation_checkpointing"):
            load_recipe("tiny", [f"model.activation_checkpointing={bad}"])


def test_a_resumed_run_may_change_how_the_model_trains(tmp_path):
    from lmpipe.train.run_folder import check_same_recipe

    def recipe(*overrides: str):
        return load_recipe("tiny", ["data=[{name: data, path: tokens}]", *overrides])

    (tmp_path / "recipe.yaml").write_text(recipe_yaml(recipe()))
    fast = [
        "model.loss_impl=chunked",
        "model.loss_chunk_tokens=64",
        "model.activation_checkpointing=full",
        "model.compile=blocks",
    ]
    check_same_recipe(recipe(*fast), tmp_path)  # accepted
    with pytest.raises(LmpipeError, match="seed"):
        check_same_recipe(recipe(*fast, "seed=2"), tmp_path)


# --- what auto means ---------------------------------------------------------------------


def test_auto_chunks_the_loss_and_compiles_on_cuda_only():
    model = GPT(config())
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (model.loss_impl(cpu), model.loss_impl(cuda)) == ("plain", "chunked")
    assert (model.compiles(cpu), model.compiles(cuda)) == (False, True)
    assert model.compiled_h == []
    compiled = model.compiled_blocks()  # wrappers only: nothing compiles until called
    assert len(compiled) == 2 and compiled[0] is not model.h[0]
    assert set(model.state_dict()) == set(GPT(config()).state_dict())  # no _orig_mod. names
    off = GPT(config(compile="none", loss_impl="plain"))
    assert not off.compiles(cuda) and off.loss_impl(cuda) == "plain"
    assert GPT(config(compile="blocks")).compiles(cpu)
    zero3 = GPT(config())
    zero3.wte.weight.ds_id = 0  # what deepspeed.zero.Init marks its partitioned parameters with
    assert not zero3.compiles(cuda)  # auto: ZeRO-3 runs uncompiled


# --- compiled blocks -------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_blocks_and_loss_give_eager_loss_and_gradients_with_one_graph_for_all_blocks():
    """Inductor on the CPU (needs a C++ compiler): about a minute cold, 10 s cached."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = config(n_layers=3)
    _, want_loss, want = loss_and_grads(cfg)
    graphs = []
    # compiled blocks; then inside activation checkpointing, with the chunked loss compiled too
    for checkpointing, loss_impl in (("none", "plain"), ("full", "chunked")):
        update = {"activation_checkpointing": checkpointing, "loss_impl": loss_impl}
        _, loss, grads = loss_and_grads(cfg.model_copy(update={**update, "compile": "blocks"}))
        assert loss == pytest.approx(want_loss, rel=1e-6)
        for name, grad in grads.items():
            assert relative_difference(grad, want[name]) <= 1e-5, name
        graphs.append(counters["stats"]["unique_graphs"])
    # one graph for three blocks (compile time is one block's, whatever n_layers), reused under
    # checkpointing; then one for the loss's softmax step
    assert graphs == [1, 2]
    # bf16 weights (DeepSpeed's bf16, the GPU path): inductor keeps fused intermediates in fp32,
    # so compiled and eager differ by bf16 roundings; measured against fp32, compiled is no worse
    fast = {"loss_impl": "chunked", "activation_checkpointing": "every_2"}
    _, _, eager = loss_and_grads(cfg.model_copy(update=fast), "bf16_weights")
    compiled = cfg.model_copy(update={**fast, "compile": "blocks"})
    _, _, bf16 = loss_and_grads(compiled, "bf16_weights")
    eager_error = max(relative_difference(eager[n], want[n]) for n in want)
    compiled_error = max(relative_difference(bf16[n], want[n]) for n in want)
    assert compiled_error <= 1.5 * eager_error, (compiled_error, eager_error)
    torch._dynamo.reset()


def test_a_compiled_block_runs_flex_attention_outside_its_graph():
    """FlexAttention is compiled on its own and keeps Python state (block masks): a compiled
    block leaves it to run as it is (forward only: flex has no CPU backward)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = GPT(config(attn_impl="flex"))
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        eager = model.h[0](x, model.slopes, "flex")
        compiled = torch.compile(model.h[0], dynamic=False)(x, model.slopes, "flex")
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert any("flex_alibi_attention" in reason for reason in counters["graph_break"])
    torch._dynamo.reset()


# --- memory of a long sequence -----------------------------------------------------------------


@pytest.mark.slow
def test_chunked_loss_lowers_peak_memory_of_a_long_sequence():
    """GPT-2's vocabulary at seq_len 2,048 on a narrow model: the loss dominates the memory."""
    cfg = config(n_layers=1, vocab_size=50257, d_model=64, n_heads=4, d_ff=256, mup=None)
    plain, plain_loss = peak_growth(cfg.model_copy(update={"loss_impl": "plain"}), "bfloat16", 2048)
    chunked_cfg = cfg.model_copy(update={"loss_impl": "chunked", "loss_chunk_tokens": 512})
    chunked, loss = peak_growth(chunked_cfg, "bfloat16", 2048)
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    logits_gib = 2048 * 50257 * 4 / 2**30  # one float32 [T, V] tensor: 0.38 GiB
    assert plain > 2 * logits_gib
    assert chunked < plain - 1.5 * logits_gib, (plain, chunked)


# --- through the training loop ---------------------------------------------------------------

# test_loop.py's small run: 16 steps, 2 micro-steps each, a stage switch; here in bf16 (ZeRO-1)
SMALL = ["precision=bf16", *LOOP_SMALL]
FAST = ["model.loss_impl=chunked", "model.loss_chunk_tokens=100", "model.activation_checkpointing=every_2"]  # fmt: skip


@pytest.mark.slow
def test_deepspeed_training_with_the_chunked_loss_and_checkpointing_follows_the_plain_run(
    pattern_tokens, tmp_path
):
    from lmpipe.train.loop import train

    losses = {}
    for name, extra in (("plain", []), ("fast", FAST)):
        train(load_recipe("tiny", [*SMALL, *extra]), pattern_tokens, tmp_path / name)
        rows = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(row)["loss"] for row in rows]
    assert len(losses["fast"]) == 16
    assert losses["fast"][0] == pytest.approx(losses["plain"][0], rel=1e-6)  # the same forward
    # then gradients that differ by bf16 roundings (see above) drift: 1.4e-3 at most, measured
    assert losses["fast"] == pytest.approx(losses["plain"], rel=5e-3)
