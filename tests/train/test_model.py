"""The model: shapes, causality, ALiBi closed forms, the two attention kernels, muP rules."""

from __future__ import annotations

import math

import pytest
import torch

from lmpipe.train.model import GPT, alibi_bias, alibi_slopes, count_parameters
from lmpipe.train.recipe import ModelConfig, MupConfig, load_recipe


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(
        n_layers=2,
        n_heads=4,
        d_model=32,
        d_ff=85,
        vocab_size=97,
        attn_impl="sdpa",
        mup=MupConfig(d_model_base=16, d_ff_base=42.5),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def wide_config(n_layers: int) -> ModelConfig:
    """4x the muP base width (m_d = 4), wide enough for init statistics to be measured."""
    return tiny_config(
        d_model=256,
        n_heads=8,
        d_ff=682,
        n_layers=n_layers,
        mup=MupConfig(d_model_base=64, d_ff_base=170.5, sigma_base=0.08),
    )


def test_alibi_slopes_match_press_et_al():
    s = alibi_slopes(32)
    assert s[0].item() == pytest.approx(2**-0.25)  # 0.8409, seeds-spec 1.1
    assert s[-1].item() == pytest.approx(2**-8)  # 0.0039
    assert torch.allclose(s[1:] / s[:-1], torch.full((31,), 2**-0.25))
    # 12 heads: the 8-head series plus every other slope of the 16-head series
    s12 = alibi_slopes(12).tolist()
    assert s12[:8] == pytest.approx([2 ** (-(h + 1)) for h in range(8)])
    assert s12[8:] == pytest.approx([2 ** (-0.5 * (2 * k + 1)) for k in range(4)])


def test_alibi_bias_is_minus_slope_times_distance_and_causal():
    slopes = torch.tensor([0.5, 0.25])
    bias = alibi_bias(slopes, 4, 4, torch.float32)
    assert bias[0, 3, 1].item() == pytest.approx(-0.5 * 2)
    assert bias[1, 2, 2].item() == 0.0
    assert torch.isinf(bias[:, 1, 2]).all()
    # queries that are the last T of S keys (a continuation after a prefix)
    tail = alibi_bias(slopes, 2, 5, torch.float32)
    assert torch.equal(tail, alibi_bias(slopes, 5, 5, torch.float32)[:, 3:, :])


def test_forward_shapes_and_loss_near_uniform_at_init():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 16))
    logits, loss = model(idx, idx.roll(1, dims=1))
    assert logits.shape == (3, 16, cfg.vocab_size) and logits.dtype == torch.float32
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 1.0


def test_unembed_takes_any_leading_dimensions():
    """[B, T, D] (forward), [N, D] (evals' scored positions) and [D] (generation's last token)
    give the same logits for the same hidden state."""
    torch.manual_seed(0)
    cfg = tiny_config()
    model = GPT(cfg)
    x_BTD = torch.randn(2, 3, cfg.d_model)
    logits_BTV = model.unembed(x_BTD)
    assert logits_BTV.shape == (2, 3, cfg.vocab_size) and logits_BTV.dtype == torch.float32
    # Equal up to float rounding: a vector and a matrix product take different kernels.
    same = dict(rtol=0, atol=1e-6)
    torch.testing.assert_close(model.unembed(x_BTD.flatten(0, 1)), logits_BTV.flatten(0, 1), **same)
    torch.testing.assert_close(model.unembed(x_BTD[1, 2]), logits_BTV[1, 2], **same)
    # the tied embedding, unscaled (muP's output multiplier is in the hidden states)
    torch.testing.assert_close(logits_BTV, x_BTD @ model.wte.weight.T, **same)


def test_causal_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 97, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 97
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.allclose(a[0, :8], b[0, :8], atol=1e-6)
    assert not torch.allclose(a[0, 8:], b[0, 8:])


def naive_attention(q, k, v, slopes, scale):
    T = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) * scale
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    scores = scores - slopes[:, None, None] * (i - j)
    scores = scores.masked_fill(j > i, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("alibi_scale", [1.0, 4.0])
def test_sdpa_and_flex_kernels_agree_with_a_naive_reference(alibi_scale):
    torch.manual_seed(0)
    cfg = tiny_config(n_layers=1)
    sdpa = GPT(cfg)
    flex = GPT(cfg.model_copy(update={"attn_impl": "flex"}))
    flex.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 97, (2, 40))
    with torch.no_grad():  # FlexAttention has no CPU backward
        a, _ = sdpa(idx, alibi_scale=alibi_scale)
        b, _ = flex(idx, alibi_scale=alibi_scale)
    assert torch.allclose(a, b, atol=1e-4)
    attn = sdpa.h[0].attn
    x = torch.randn(2, 40, 32)
    q, k, v = (t.view(2, 40, 4, 8).transpose(1, 2) for t in attn.c_attn(x).split(32, dim=2))
    slopes = sdpa.slopes / alibi_scale
    ref = naive_attention(q, k, v, slopes, 1 / 8)
    with torch.no_grad():
        got = attn(x, slopes, "sdpa")
        ref_out = attn.c_proj(ref.transpose(1, 2).reshape(2, 40, 32))
    assert torch.allclose(got, ref_out, atol=1e-5)


def test_alibi_scale_changes_long_range_attention():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 97, (1, 32))
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(idx, alibi_scale=2.0)
        model.slopes /= 2  # interpolation by 2 is every slope halved (seeds-spec 2)
        halved, _ = model(idx)
    assert torch.allclose(a[0, 0], b[0, 0], atol=1e-5)  # the first token sees only itself
    assert not torch.allclose(a[0, -1], b[0, -1], atol=1e-4)
    assert torch.allclose(b, halved, atol=1e-6)


def test_mup_init_stds_and_lr_groups_follow_cerebras_rules():
    btlm = load_recipe("btlm3b").model
    cfg = btlm.model_copy(update={"n_layers": 32})
    model = GPT.__new__(GPT)  # the rules only; building 2.6B parameters is not needed
    torch.nn.Module.__init__(model)
    model.cfg, model.m_d, model.m_ffn = cfg, 2560 / 256, 6826 / 682.6
    assert model.init_std("wte.weight") == pytest.approx(0.073)
    assert model.init_std("h.0.attn.c_attn.weight") == pytest.approx(0.023085, rel=1e-4)
    assert model.init_std("h.3.attn.c_proj.weight") == pytest.approx(0.0028856, rel=1e-4)
    assert model.lr_scale("h.0.mlp.c_fc.weight") == pytest.approx(0.1)
    assert model.lr_scale("h.0.mlp.c_proj.weight") == pytest.approx(0.1, rel=1e-4)
    assert model.lr_scale("h.0.attn.c_attn.bias") == 1.0
    assert model.lr_scale("wte.weight") == 1.0


def test_initialised_weights_have_the_mup_std_and_groups_cover_every_parameter():
    torch.manual_seed(0)
    cfg = wide_config(n_layers=4)
    model = GPT(cfg)
    w = model.h[0].attn.c_attn.weight
    expected = 0.08 / math.sqrt(4)  # sigma_base / sqrt(m_d)
    assert w.std().item() == pytest.approx(
        expected * 0.88, rel=0.05
    )  # truncation at 2 sigma: 0.88 sigma
    assert w.abs().max().item() <= 2 * expected + 1e-6
    groups = model.param_groups(lr=0.01, weight_decay=0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    by_lr = {round(g["lr"], 8): g for g in groups if g["weight_decay"] > 0}
    assert 0.01 in by_lr and 0.0025 in by_lr  # embedding keeps eta_base; hidden eta_base / m_d
    no_decay = [p for g in groups if g["weight_decay"] == 0 for p in g["params"]]
    assert all(p.ndim == 1 for p in no_decay)  # exactly the biases and LayerNorms


def test_truncated_normal_redraws_only_the_values_outside_two_stds():
    """The first draw is torch's normal_ from the seed; values within +-2 std stay as drawn, the
    others are drawn again until within: Normal(0, std) truncated at 2 std (std 0.8796 std)."""
    from lmpipe.train.model import truncated_normal_

    torch.manual_seed(3)
    w = torch.empty(400, 500)
    truncated_normal_(w, 0.05)
    torch.manual_seed(3)
    first = torch.empty(400, 500).normal_(0.0, 0.05)
    inside = first.abs() <= 0.1
    assert 0.95 < inside.float().mean().item() < 0.96  # 95.45% of a normal lies within 2 std
    assert torch.equal(w[inside], first[inside]) and not torch.equal(w, first)
    assert w.abs().max().item() <= 0.1
    assert w.std().item() == pytest.approx(0.05 * 0.8796, rel=0.01)
    torch.manual_seed(3)
    again = torch.empty(400, 500)
    truncated_normal_(again, 0.05)
    assert torch.equal(again, w)  # the seed decides


def test_output_multiplier_scales_logits_by_alpha_out_over_m_d():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = GPT(cfg)
    idx = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        logits, _ = model(idx)
        doubled = GPT(
            cfg.model_copy(
                update={"mup": cfg.mup.model_copy(update={"alpha_out": 2 * cfg.mup.alpha_out})}
            )
        )
        doubled.load_state_dict(model.state_dict())
        logits2, _ = doubled(idx)
        # the final LayerNorm's output, before any multiplier
        seen = []
        handle = model.ln_f.register_forward_hook(lambda mod, inp, out: seen.append(out))
        model(idx)
        handle.remove()
    assert torch.allclose(logits2, 2 * logits, atol=1e-5)
    # d_model 32 over the base 16: m_d = 2, so the logits are alpha_out / 2 times ln_f(h) W_e^T
    by_hand = (cfg.mup.alpha_out / 2) * seen[0] @ model.wte.weight.T
    assert torch.allclose(logits, by_hand, atol=1e-5)


def test_parameter_count_matches_the_module_and_btlm():
    cfg = tiny_config()
    assert count_parameters(cfg) == sum(p.numel() for p in GPT(cfg).parameters())
    assert count_parameters(load_recipe("btlm3b").model) == 2_646_255_744  # seeds-spec 1.1: ~2.646B


def test_sparse_mup_masks_init_and_learning_rates():
    """SμPar (seeds-spec 4): hidden init variance and Adam rate both divided by m_d * m_rho."""
    torch.manual_seed(0)
    dense_cfg = wide_config(n_layers=2)
    sparse = GPT(dense_cfg.model_copy(update={"density": 0.25}))
    w = sparse.h[0].attn.c_attn.weight
    assert (w != 0).float().mean().item() == pytest.approx(0.25, abs=1e-4)
    expected = 0.08 / math.sqrt(4 * 0.25)  # sigma_base / sqrt(m_d * m_rho)
    assert w[w != 0].std().item() == pytest.approx(expected * 0.88, rel=0.05)
    assert sparse.wte.weight.count_nonzero() == sparse.wte.weight.numel()  # embeddings stay dense
    assert sparse.lr_scale("h.0.attn.c_attn.weight") == pytest.approx(1 / (4 * 0.25))
    assert sparse.lr_scale("h.0.mlp.c_proj.weight") == pytest.approx(1 / (682 / 170.5 * 0.25))
    assert sparse.lr_scale("h.0.attn.c_attn.bias") == 1.0


def test_sparse_weights_stay_zero_through_adamw_steps():
    torch.manual_seed(0)
    model = GPT(tiny_config(density=0.5))
    zeros = {n: (p == 0).clone() for n, p in model.named_parameters() if model.is_hidden(n)}
    optimizer = torch.optim.AdamW(model.param_groups(lr=1e-2, weight_decay=0.1))
    for _ in range(3):
        idx = torch.randint(0, 97, (2, 16))
        _, loss = model(idx, idx.roll(1, dims=1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        if name in zeros:
            assert (p[zeros[name]] == 0).all(), name
            assert (p[~zeros[name]] != 0).any(), name  # the kept weights do train


def test_density_one_is_the_dense_model():
    torch.manual_seed(0)
    a = GPT(tiny_config())
    torch.manual_seed(0)
    b = GPT(tiny_config(density=1.0))
    for x, y in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(x, y)


# --- Cerebras-GPT: learned positions, GELU, standard parametrisation --------------------------


def cerebras_config(**overrides) -> ModelConfig:
    """A small Cerebras-GPT-shaped model: learned positions, GELU 4 d, SP unless told."""
    shape = dict(n_layers=3, d_model=64, d_ff=256, position="learned", n_positions=32)
    return tiny_config(**{**shape, "mlp": "gelu", "mup": None, **overrides})


def test_gelu_mlp_is_gpt2s_layout():
    torch.manual_seed(0)
    model = GPT(cerebras_config())
    mlp = model.h[0].mlp
    assert mlp.c_fc2 is None and mlp.c_fc.weight.shape == (256, 64)
    x = torch.randn(2, 5, 64)
    want = mlp.c_proj(torch.nn.functional.gelu(mlp.c_fc(x)))  # exact (erf) GELU
    assert torch.allclose(mlp(x), want)


def test_learned_positions_are_added_before_alpha_in_and_end_at_n_positions():
    torch.manual_seed(0)
    cfg = cerebras_config(mup=MupConfig(d_model_base=32, d_ff_base=128, alpha_in=10.0))
    model = GPT(cfg).eval()
    idx = torch.randint(0, 97, (1, 32))
    captured = {}
    model.h[0].register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    with torch.no_grad():
        logits, _ = model(idx)
    want = (model.wte(idx) + model.wpe(torch.arange(32))) * 10.0
    assert torch.allclose(captured["x"], want)
    # positions matter: the same token at two places reads differently
    with torch.no_grad():
        same, _ = model(torch.full((1, 4), 5))
    assert not torch.allclose(same[0, 1], same[0, 2], atol=1e-4)
    with pytest.raises(ValueError, match="33 tokens exceed the 32 learned positions"):
        model(torch.randint(0, 97, (1, 33)))
    # causal without ALiBi: the future does not change the past
    changed = idx.clone()
    changed[0, 20:] = (changed[0, 20:] + 1) % 97
    with torch.no_grad():
        other, _ = model(changed)
    assert torch.allclose(logits[0, :20], other[0, :20], atol=1e-5)


def test_position_embeddings_are_embeddings_under_mup():
    torch.manual_seed(0)
    cfg = cerebras_config(d_model=256, d_ff=1024, n_heads=4, n_layers=2, mup=MupConfig(d_model_base=64, d_ff_base=256, sigma_base=0.08))  # fmt: skip
    model = GPT(cfg)
    assert model.init_std("wpe.weight") == 0.08 and model.lr_scale("wpe.weight") == 1.0
    assert model.group_of("wpe.weight") == "embedding"
    assert model.wpe.weight.std().item() == pytest.approx(0.08 * 0.88, rel=0.05)
    groups = {g["name"]: g for g in model.param_groups(lr=6e-3, weight_decay=0.1)}
    assert groups["hidden"]["lr"] == pytest.approx(6e-3 / 4)  # eta_base x 64 / 256
    assert any(p is model.wpe.weight for p in groups["embedding"]["params"])


def test_standard_parametrisation_is_every_multiplier_one():
    torch.manual_seed(0)
    model = GPT(cerebras_config(d_model=256, d_ff=1024, n_layers=4))
    assert (model.m_d, model.m_ffn, model.alpha_in, model.alpha_out) == (1.0, 1.0, 1.0, 1.0)
    assert model.h[0].attn.scale == pytest.approx(64**-0.5)  # q.k / sqrt(d_head)
    assert model.init_std("wte.weight") == model.init_std("h.0.attn.c_attn.weight") == 0.02
    assert model.init_std("h.1.mlp.c_proj.weight") == pytest.approx(0.02 / math.sqrt(8))
    assert model.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02 * 0.88, rel=0.05)
    rates = {g["name"]: g["lr"] for g in model.param_groups(lr=6e-4, weight_decay=0.1)}
    assert set(rates.values()) == {6e-4}  # one learning rate
    assert GPT(cerebras_config(init_std=0.05)).init_std("wte.weight") == 0.05
