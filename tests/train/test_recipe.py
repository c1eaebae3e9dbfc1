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
        # the same tokens per step and the same accumulation in every stage
        assert s.global_batch * s.seq_len == recipe.tokens_per_step
        assert s.micro_batch * plan.grad_accum * s.seq_len == recipe.tokens_per_step


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
