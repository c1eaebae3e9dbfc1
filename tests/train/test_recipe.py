"""Recipes: every shipped YAML validates, BTLM's numbers, overrides, and errors with dotted paths."""

from __future__ import annotations

import pytest

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.train.plan import deepspeed_config, lr_multiplier, make_plan
from lmpipe.train.recipe import load_recipe, shipped_recipes


@pytest.mark.parametrize("name", shipped_recipes())
def test_every_shipped_recipe_validates_and_plans(name):
    recipe = load_recipe(name)
    plan = make_plan(recipe)
    assert plan.total_tokens == recipe.total_tokens
    assert sum(s.steps for s in plan.stages) == plan.total_steps
    for s in plan.stages:
        # each stage's tokens per step, whole micro-steps of micro_batch_tokens
        assert s.global_batch * s.seq_len == recipe.stage_tokens_per_step(s.index)
        assert s.micro_batch * s.grad_accum * s.seq_len == s.tokens_per_step


def test_shipped_recipes_include_tiny_and_btlm3b():
    assert {"tiny", "btlm3b"} <= set(shipped_recipes())


def test_btlm3b_plan_matches_the_released_configs():
    recipe = load_recipe("btlm3b")
    plan = make_plan(recipe, world_size=8)
    assert plan.n_params == 2_646_255_744
    assert recipe.tokens_per_step == 3_932_160
    first, second = plan.stages
    assert (first.seq_len, first.global_batch, first.steps) == (2048, 1920, 119_727)
    assert (second.seq_len, second.global_batch, second.steps, second.first_step) == (
        8192,
        480,
        39_909,
        119_727,
    )
    assert plan.total_steps == 159_636
    assert plan.grad_accum == 60  # 3,932,160 / (8,192 x 8)
    ds = deepspeed_config(recipe, plan)
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"]
    assert ds["bf16"]["check_grad_overflow"]  # the guard relies on it: a non-finite step skipped
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"  # not bf16 over 60 micro-steps


def test_lr_schedule_warms_up_then_decays_linearly_to_end_lr_across_stages():
    recipe = load_recipe("btlm3b")
    s, peak, total = recipe.schedule, recipe.optimizer.lr, recipe.total_tokens
    per_step = recipe.tokens_per_step
    assert lr_multiplier(0, s, peak, total) == 0.0
    assert lr_multiplier(95 * per_step, s, peak, total) == pytest.approx(1.0)
    assert lr_multiplier(total, s, peak, total) * peak == pytest.approx(1.0198e-4)
    # no jump at the 2k -> 8k boundary: one schedule across both stages
    boundary = 119_727 * per_step
    before, after = (
        lr_multiplier(boundary - per_step, s, peak, total),
        lr_multiplier(boundary, s, peak, total),
    )
    assert 0 < before - after < 1e-5
    mid = lr_multiplier((95 * per_step + total) // 2, s, peak, total)
    assert mid == pytest.approx((1 + 1.0198e-4 / peak) / 2, rel=1e-6)


def test_overrides_apply_before_validation():
    recipe = load_recipe(
        "tiny",
        [
            "model.n_layers=3",
            "optimizer.lr=6.0e-2",
            "stages.1.tokens=4096",
            "optimizer.betas=[0.8, 0.9]",
        ],
    )
    assert recipe.model.n_layers == 3
    assert recipe.optimizer.lr == 6.0e-2
    assert recipe.stages[1].tokens == 4096
    assert recipe.optimizer.betas == (0.8, 0.9)


def test_unknown_key_names_its_dotted_path():
    with pytest.raises(LmpipeError, match=r"model\.n_head: unknown key"):
        load_recipe("tiny", ["model.n_head=4"])


def test_all_errors_reported_at_once():
    with pytest.raises(LmpipeError) as e:
        load_recipe("tiny", ["model.n_layers=0", "optimizer.eps=-1", "bogus=1"])
    message = str(e.value)
    assert (
        "model.n_layers" in message
        and "optimizer.eps" in message
        and "bogus: unknown key" in message
    )
    assert "\n" not in message


def test_heads_must_divide_width():
    with pytest.raises(LmpipeError, match=r"d_model \(64\) is not divisible by n_heads \(3\)"):
        load_recipe("tiny", ["model.n_heads=3"])


def test_stage_shapes_checked():
    with pytest.raises(
        LmpipeError, match=r"stages\.0\.seq_len \(100\) does not divide micro_batch_tokens"
    ):
        load_recipe("tiny", ["stages.0.seq_len=100"])
    with pytest.raises(LmpipeError, match=r"stages\.1\.tokens .* whole number of steps"):
        load_recipe("tiny", ["stages.1.tokens=5000"])


def test_world_size_that_does_not_divide_the_batch_is_refused():
    with pytest.raises(LmpipeError, match="world size"):
        make_plan(load_recipe("tiny"), world_size=3)


def test_recipe_file_path_and_missing_recipe(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        (load_recipe.__globals__["recipe_source"]("tiny")[1]).replace("name: tiny", "name: mine")
    )
    assert load_recipe(str(path)).name == "mine"
    with pytest.raises(LmpipeError, match="not a shipped recipe"):
        load_recipe("nonexistent")
    with pytest.raises(LmpipeError, match="no such recipe file"):
        load_recipe(str(tmp_path / "missing.yaml"))


def test_bad_override_syntax():
    with pytest.raises(LmpipeError, match="expected dotted.key=value"):
        load_recipe("tiny", ["model.n_layers"])


def test_bf16_without_zero_is_refused():
    with pytest.raises(LmpipeError, match="bf16 needs zero_stage >= 1"):
        load_recipe("btlm3b", ["zero_stage=0"])
    assert load_recipe("tiny", ["zero_stage=0"]).precision == "fp32"  # fp32 needs no master copy


# --- the Cerebras-GPT family (seeds-spec 3.1-3.3) ---------------------------------------------

# name: layers, d_model, heads, d_ff, SP peak LR, sequences a step, steps, warmup steps, decay
CEREBRAS_GPT = {
    "111m": (10, 768, 12, 3072, 6.0e-4, 120, 9_037, 1_525, "linear"),
    "256m": (14, 1088, 17, 4352, 6.0e-4, 264, 9_468, 693, "linear"),
    "590m": (18, 1536, 12, 6144, 2.0e-4, 264, 21_836, 693, "linear"),
    "1.3b": (24, 2048, 16, 8192, 2.0e-4, 528, 24_334, 346, "cosine"),
    "2.7b": (32, 2560, 32, 10240, 2.0e-4, 528, 49_041, 346, "cosine"),
    "6.7b": (32, 4096, 32, 16384, 1.2e-4, 1040, 62_522, 176, "linear"),
    "13b": (40, 5120, 40, 20480, 1.2e-4, 720, 57_000, 254, "cosine"),
}
MUP_SIZES = ("111m", "256m", "590m", "1.3b", "2.7b")


@pytest.mark.parametrize(
    "size, mup", [(s, False) for s in CEREBRAS_GPT] + [(s, True) for s in MUP_SIZES]
)
def test_cerebras_gpt_recipes_state_the_papers_numbers(size, mup):
    layers, d, heads, ff, lr, seqs, steps, warmup, decay = CEREBRAS_GPT[size]
    recipe = load_recipe(f"cerebras-gpt-{size}" + ("-mup" if mup else ""))
    m = recipe.model
    assert (m.n_layers, m.d_model, m.n_heads, m.d_ff) == (layers, d, heads, ff)
    assert (m.position, m.n_positions, m.mlp, m.vocab_size) == ("learned", 2048, "gelu", 50257)
    assert recipe.tokens_per_step == seqs * 2048 and recipe.stages[0].seq_len == 2048
    plan = make_plan(recipe)
    assert plan.stages[0].steps == steps
    assert recipe.schedule.warmup_tokens == warmup * seqs * 2048  # ~375M tokens
    assert recipe.schedule.decay == decay
    assert recipe.optimizer.eps == (1e-9 if size in ("6.7b", "13b") else 1e-8)
    assert (recipe.optimizer.betas, recipe.optimizer.weight_decay) == ((0.9, 0.95), 0.1)
    if mup:
        mp = m.mup
        assert (mp.d_model_base, mp.d_ff_base, mp.sigma_base) == (256, 1024, 0.08)
        assert (mp.alpha_in, mp.alpha_out, mp.qk_scale) == (10, 1, "d_head")
        assert recipe.optimizer.lr == 6.0e-3 and m.init_std is None
    else:
        assert m.mup is None and recipe.optimizer.lr == lr
    assert recipe.schedule.end_lr == pytest.approx(recipe.optimizer.lr / 10)  # to 10% of peak


def test_cerebras_gpt_13b_switches_from_720_to_1080_sequences_at_step_57000():
    recipe = load_recipe("cerebras-gpt-13b")
    plan = make_plan(recipe, world_size=8)
    first, second = plan.stages
    assert (first.global_batch, first.steps, first.grad_accum) == (720, 57_000, 90)
    assert (second.global_batch, second.steps, second.first_step) == (1080, 78_223, 57_000)
    assert second.grad_accum == 135  # one 2,048-token sequence a micro-step on each of 8 ranks
    assert plan.total_tokens == 257_066_680_320  # 2.57e11 (seeds-spec 3.1)
    # one schedule in tokens across the switch: the multiplier is continuous there
    before = lr_multiplier(plan.tokens_at(56_999), recipe.schedule, 1.2e-4, plan.total_tokens)
    at = lr_multiplier(plan.tokens_at(57_000), recipe.schedule, 1.2e-4, plan.total_tokens)
    after = lr_multiplier(plan.tokens_at(57_001), recipe.schedule, 1.2e-4, plan.total_tokens)
    assert before > at > after and (at - after) > (before - at)  # bigger steps after the switch


def test_13b_plan_at_one_rank():
    plan = make_plan(load_recipe("cerebras-gpt-13b"))
    assert [s.grad_accum for s in plan.stages] == [720, 1080]


# nominal sizes, as the model names say (BTLM-3B is 2.6B; seeds-spec 1.1)
NOMINAL = {"btlm3b": 2.6e9, "proxy": None, "tiny": None}


@pytest.mark.parametrize("name", shipped_recipes())
def test_every_shipped_model_builds_on_the_meta_device_with_the_closed_form_count(name):
    import torch

    from lmpipe.train.model import GPT, count_parameters

    recipe = load_recipe(name)
    with torch.device("meta"):
        model = GPT(recipe.model)
    n = sum(p.numel() for p in model.parameters())
    assert n == count_parameters(recipe.model) == make_plan(recipe).n_params
    nominal = NOMINAL.get(name)
    if name.startswith("cerebras-gpt-"):
        size = name.split("-")[2]
        nominal = float(size[:-1]) * (1e9 if size.endswith("b") else 1e6)
    if nominal is not None:
        assert abs(n / nominal - 1) < 0.03, (name, n)


def test_cerebras_gpt_2_7b_and_13b_counts():
    from lmpipe.train.model import count_parameters

    assert count_parameters(load_recipe("cerebras-gpt-2.7b").model) == 2_651_553_280
    assert count_parameters(load_recipe("cerebras-gpt-13b").model) == 12_853_386_240


def test_options_that_do_not_go_together_are_refused_with_the_key():
    with pytest.raises(
        LmpipeError, match=r"stages\.0\.seq_len \(4096\) exceeds model\.n_positions"
    ):
        load_recipe("cerebras-gpt-111m", ["stages.0.seq_len=4096", "micro_batch_tokens=16384"])
    with pytest.raises(
        LmpipeError, match=r"stages\.1\.alibi_scale \(4\) needs model\.position alibi"
    ):
        load_recipe("tiny", ["model.position=learned", "stages.1.alibi_scale=4"])
    with pytest.raises(LmpipeError, match=r"mup\.d_ff_base \(682\.6\) does not fit"):
        load_recipe("btlm3b", ["model.mlp=gelu", "model.d_ff=10240"])
    with pytest.raises(LmpipeError, match="init_std is the standard parametrisation's"):
        load_recipe("btlm3b", ["model.init_std=0.02"])
    with pytest.raises(
        LmpipeError, match=r"stages\.0\.alibi_scale: Input should be greater than or equal to 1"
    ):
        load_recipe("tiny", ["stages.0.alibi_scale=0.5"])
    with pytest.raises(LmpipeError, match=r"stages\.1\.tokens_per_step \(1000\) is not a multiple"):
        load_recipe("tiny", ["stages.1.tokens_per_step=1000"])


def test_sp_is_mup_null_and_a_proxy_recipe_ships():
    sp = load_recipe("cerebras-gpt-111m")
    assert sp.model.mup is None and sp.model.init_std == 0.02
    proxy = load_recipe("proxy")
    assert proxy.model.d_model == proxy.model.mup.d_model_base == 256
    assert (proxy.model.position, proxy.model.mlp) == ("alibi", "swiglu")
    assert proxy.model.mup == load_recipe("btlm3b").model.mup  # BTLM's base and values
