"""`lmpipe mup coord-check`: muP's activations stay the same size across widths, SP's grow."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lmpipe.cli.app import app
from lmpipe.dataprep.errors import LmpipeError
from lmpipe.train.coord_check import CoordCheck, coord_check, width_config
from lmpipe.train.recipe import load_recipe, recipe_yaml

# The proxy (BTLM's shape, muP base 256) cut to 2 layers and a 512-token vocabulary for CI.
SMALL_PROXY = ["model.n_layers=2", "model.vocab_size=512"]
HIDDEN = ("attn.0", "mlp.0", "attn.1", "mlp.1", "hidden")


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    out = tmp_path_factory.mktemp("coord") / "cc"
    check = CoordCheck(
        load_recipe("proxy", SMALL_PROXY), (64, 128, 256, 512), steps=5, params=("mup", "sp"),
        batch_size=4, seq_len=64, lr=1e-3,
    )  # fmt: skip
    return out, coord_check(check, out)


def test_mup_activations_stay_flat_across_widths_and_sp_ones_grow(both):
    _, report = both
    mup, sp = report["params"]["mup"]["slopes"], report["params"]["sp"]["slopes"]
    assert abs(mup["embedding"]) < 0.05 and abs(sp["embedding"]) < 0.05
    for q in HIDDEN:
        assert abs(mup[q]) < 0.3, (q, mup[q])
        assert sp[q] > 0.8, (q, sp[q])  # SP: the hidden states grow about as fast as the width
    # muP's logits start O(1/sqrt(width)) (the tied unembedding times 1/m_d) and never grow with it
    assert mup["logits"] < 0.1 and sp["logits"] > 0.3


def test_coord_json_png_and_manifest(both):
    out, report = both
    saved = json.loads((out / "coord.json").read_text())
    assert saved == report and saved["widths"] == [64, 128, 256, 512]
    coords = saved["params"]["mup"]["coords"]
    assert list(coords) == ["embedding", *HIDDEN, "logits"]  # in the order the model runs them
    assert all(len(v) == 5 for q in coords.values() for v in q.values())  # every step recorded
    assert (out / "coord.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "coord-check" and manifest["slopes"] == {
        p: r["slopes"] for p, r in report["params"].items()
    }


def test_widths_keep_the_head_size_ffn_ratio_and_base_shapes():
    model = load_recipe("proxy").model
    wide = width_config(model, 1024, "mup")
    assert (wide.n_heads, wide.d_head, wide.d_ff, wide.mup) == (16, 64, 2728, model.mup)  # 4 x 682
    sp = width_config(model, 1024, "sp")
    assert sp.mup is None and sp.init_std == model.mup.sigma_base
    # mup-uncorrected (as a sweep's --param): muP with SμPar's density correction off, else the same
    uncorrected = width_config(model, 1024, "mup-uncorrected")
    assert model.mup.sparse_correction and not uncorrected.mup.sparse_correction
    assert uncorrected.model_copy(update={"mup": model.mup}) == wide


def test_bad_settings_are_one_line_errors(tmp_path):
    proxy = load_recipe("proxy")
    cases = [
        (CoordCheck(proxy, (256,)), "at least two widths"),
        (CoordCheck(proxy, (128, 100)), "100 is not a multiple of the head size 64"),
        (CoordCheck(load_recipe("cerebras-gpt-111m"), (128, 256)), "has no muP base shapes"),
        (
            CoordCheck(proxy, (128, 256), params=("mup", "xp")),
            r"--param: mup, mup-uncorrected, sp \(got xp\)$",
        ),
        (
            CoordCheck(load_recipe("cerebras-gpt-111m"), (128, 256), params=("mup-uncorrected",)),
            "has no muP base shapes",
        ),
    ]
    for check, message in cases:
        with pytest.raises(LmpipeError, match=message):
            coord_check(check, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, ["mup", "coord-check", "--recipe", "proxy", "--widths", "1,x", "-o", str(tmp_path / "o")])  # fmt: skip
    assert result.exit_code == 2 and "comma-separated integers" in result.output


def test_sp_recipes_can_be_checked_as_sp(tmp_path):
    check = CoordCheck(
        load_recipe("cerebras-gpt-111m", ["model.n_layers=1", "model.vocab_size=256"]),
        (64, 128), steps=2, params=("sp",), batch_size=2, seq_len=16, lr=1e-3,
    )  # fmt: skip
    report = coord_check(check, tmp_path / "sp")
    assert list(report["params"]) == ["sp"]


def test_a_recipe_with_the_chunked_loss_is_checked_on_the_plain_one(tmp_path):
    """The check records the logits, which the chunked loss never forms."""
    settings = ["model.n_layers=1", "model.vocab_size=256", "model.loss_impl=chunked"]
    check = CoordCheck(
        load_recipe("tiny", settings), (32, 64), steps=1, params=("mup",), batch_size=2,
        seq_len=16, lr=1e-3,
    )  # fmt: skip
    report = coord_check(check, tmp_path / "chunked")
    assert json.loads((tmp_path / "chunked" / "coord.json").read_text()) == report
    assert "logits" in json.dumps(report)


def test_recipes_lists_every_shipped_recipe():
    from lmpipe.train.recipe import shipped_recipes

    result = CliRunner().invoke(app, ["recipes"])
    assert result.exit_code == 0
    for name in shipped_recipes():
        assert name in result.output
    assert "12,853,386,240" in result.output and "2,646,255,744" in result.output


def test_cerebras_gpt_mup_shape_is_flat_too(tmp_path):
    """Learned positions and GELU under Cerebras-GPT's muP (base 256, FFN base 1,024)."""
    check = CoordCheck(
        load_recipe("cerebras-gpt-111m-mup", SMALL_PROXY), (64, 128, 256, 512), steps=4,
        params=("mup", "sp"), batch_size=4, seq_len=32, lr=6e-4,
    )  # fmt: skip
    report = coord_check(check, tmp_path / "cc")
    mup, sp = report["params"]["mup"]["slopes"], report["params"]["sp"]["slopes"]
    for q in HIDDEN:
        assert abs(mup[q]) < 0.3 and sp[q] > 0.8, (q, mup[q], sp[q])


def test_overwrite_never_deletes_the_recipe_file_it_reads(tmp_path):
    out = tmp_path / "cc"
    out.mkdir()
    mine = out / "my.yaml"  # e.g. the recipe.yaml an earlier check wrote, reused
    text = recipe_yaml(load_recipe("proxy"))
    mine.write_text(text, encoding="utf-8")
    args = ["mup", "coord-check", "--recipe", str(mine), "--widths", "64,128", "--steps", "1",
            "--batch-size", "1", "--set", "model.n_layers=1", "-o", str(out), "--overwrite"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: {out}: the output folder contains {mine}, which this stage reads; "
        "choose an output outside everything it reads"
    )
    assert mine.read_text(encoding="utf-8") == text


def test_recipes_shows_small_tokens_per_parameter_with_three_digits():
    result = CliRunner().invoke(app, ["recipes"])
    rows = {line.split()[0]: line.split() for line in result.output.splitlines() if line.strip()}
    # proxy: 262,144 tokens / 16,024,656 parameters; tiny: 131,072 / 3,316,456; btlm3b: 237.2
    assert "0.0164" in rows["proxy"] and "0.0395" in rows["tiny"] and "237" in rows["btlm3b"]
