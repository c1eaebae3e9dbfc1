"""Model folders that are damaged or hostile: a config.json or recipe.yaml that claims a model far
larger than its weights is refused before anything is built, non-finite muP values name their
config.json key, and imported weights that are not finite floats name the tensor."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.train.checkpoint import load_model
from lmpipe.train.hf import export_model, import_model, load_hf_model
from lmpipe.train.hf_config import read_config
from tests.train.test_hf import ALIBI, edit_config, edit_tensors, make_model_folder, one_line

safetensors_torch = pytest.importorskip("safetensors.torch")

LEARNED = ["model.position=learned", "model.n_positions=256", "model.mlp=gelu", "model.d_ff=256"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """The tiny model (2 blocks, d_model 64, d_ff 170, ALiBi) as an lmpipe model folder and
    exported, and a learned-position one (256 positions) exported."""
    root = tmp_path_factory.mktemp("made")
    make_model_folder(root / "model", ALIBI)
    export_model(root / "model", root / "hf")
    make_model_folder(root / "learned_model", [*LEARNED, "model.mup=null"])
    export_model(root / "learned_model", root / "learned")
    return root


def copy(made: Path, name: str, tmp_path: Path) -> Path:
    shutil.copytree(made / name, tmp_path / name)
    return tmp_path / name


def refused_fast(load: Callable[[], Any], *parts: str) -> None:
    """Refused in one line, in well under the time building the claimed model would take (a
    billion blocks: minutes and every byte of memory, before)."""
    start = time.perf_counter()
    with pytest.raises(LmpipeError) as error:
        load()
    one_line(error, *parts)
    assert time.perf_counter() - start < 20


# config.json key -> (the value claimed, what the weights hold: 2 blocks, d_model 64, d_ff 170)
HUGE_CONFIG = {
    "n_layer": (10**9, "2 blocks"),
    "n_embd": (2**30, "64 columns of wte.weight"),
    "n_inner": (10**9, "170 columns of mlp.c_proj.weight"),
}


@pytest.mark.parametrize("key", list(HUGE_CONFIG))
def test_a_config_json_claiming_more_than_its_weights_is_refused_before_building(made, tmp_path, key):  # fmt: skip
    value, held = HUGE_CONFIG[key]
    folder = copy(made, "hf", tmp_path)
    edit_config(folder, **{key: value})
    message = f"{folder / 'config.json'}: {key} {value}: more than the weights hold ({held})"
    refused_fast(lambda: load_hf_model(folder), message)
    with pytest.raises(LmpipeError):
        import_model(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_more_learned_positions_than_stored_is_refused(made, tmp_path):
    folder = copy(made, "learned", tmp_path)
    edit_config(folder, n_positions=10**12)
    held = "256 rows of wpe.weight"
    message = f"config.json: n_positions {10**12}: more than the weights hold ({held})"
    refused_fast(lambda: load_hf_model(folder), message)


def edit_recipe(folder: Path, **fields: Any) -> None:
    path = folder / "recipe.yaml"
    recipe = yaml.safe_load(path.read_text())
    recipe["model"]["mup"].update(fields.pop("mup", {}))
    recipe["model"].update(fields)
    path.write_text(yaml.safe_dump(recipe))


# recipe.yaml's model key -> (the value claimed, what model.pt holds)
HUGE_RECIPE = {
    "n_layers": (100_000, "2 blocks"),
    "vocab_size": (10**9, "50257 rows of wte.weight"),
    "d_ff": (10**7, "170 columns of mlp.c_proj.weight"),
}


@pytest.mark.parametrize("key", list(HUGE_RECIPE))
def test_a_model_recipe_claiming_more_than_its_weights_is_refused_before_building(made, tmp_path, key):  # fmt: skip
    value, held = HUGE_RECIPE[key]
    folder = copy(made, "model", tmp_path)
    # muP's FFN base keeps d_ff / d_ff_base = d_model / d_model_base (2), which the recipe checks
    edit_recipe(folder, **{key: value}, mup={"d_ff_base": value / 2} if key == "d_ff" else {})
    message = f"model.{key} {value}: more than the weights hold ({held}) in model.pt"
    refused_fast(lambda: load_model(folder), f"{folder / 'recipe.yaml'}: {message}")
    refused_fast(lambda: export_model(folder, tmp_path / "hf"), message)  # meta, then the weights
    assert not (tmp_path / "hf").exists()


def test_a_smaller_model_than_its_weights_is_still_named_by_tensor(made, tmp_path):
    # a recipe or config that claims less than the file is built (it is small) and the loading
    # names what differs, as before
    folder = copy(made, "hf", tmp_path)
    edit_config(folder, n_layer=1)
    with pytest.raises(LmpipeError) as error:
        load_hf_model(folder)
    one_line(error, "tensor transformer.h.1.", "is not part of the model config.json describes")


def read_edited_config(made: Path, tmp_path: Path, key: str, value: Any) -> pytest.ExceptionInfo:
    folder = tmp_path / "hf"
    folder.mkdir()
    config = json.loads((made / "hf" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(LmpipeError) as error:
        read_config(folder)
    assert str(error.value).startswith(f"{folder / 'config.json'}: {key}")
    assert "errors.pydantic.dev" not in str(error.value)
    return error


# (config.json key, value, the value as the message shows it)
NON_FINITE = [
    ("mup_width_scale", float("inf"), "inf"),
    ("mup_output_alpha", float("inf"), "inf"),
    ("mup_embeddings_scale", float("nan"), "nan"),
    ("initializer_range", float("nan"), "nan"),
    ("layer_norm_epsilon", float("nan"), "nan"),
    ("layer_norm_epsilon", -1, "-1.0"),
]


@pytest.mark.parametrize(("key", "value", "shown"), NON_FINITE)
def test_non_finite_or_negative_config_values_name_their_key(made, tmp_path, key, value, shown):
    error = read_edited_config(made, tmp_path, key, value)
    one_line(error, f"config.json: {key} {shown}: must be a finite number above 0")


def test_a_config_value_past_floats_range_names_its_key(made, tmp_path):
    error = read_edited_config(made, tmp_path, "layer_norm_epsilon", 10**400)
    one_line(error, f"config.json: layer_norm_epsilon {10**400}: too large")


def test_a_pydantic_error_names_the_config_key_and_value_not_a_link(made, tmp_path):
    # width 1e-12 passes its own check, but gives muP a base width of 0
    error = read_edited_config(made, tmp_path, "mup_width_scale", 1e-12)
    one_line(
        error,
        "config.json: mup_width_scale 1e-12: gives d_model_base 0.0: Input should be greater than 0",
    )


def nan_in_one(t: dict[str, torch.Tensor]) -> None:
    t["transformer.h.1.attn.c_proj.weight"][3, 5] = float("nan")


def inf_in_one(t: dict[str, torch.Tensor]) -> None:
    t["transformer.ln_f.bias"][0] = float("-inf")


def to_bool(t: dict[str, torch.Tensor]) -> None:
    t["transformer.h.0.mlp.c_fc.bias"] = t["transformer.h.0.mlp.c_fc.bias"] > 0


def to_int(t: dict[str, torch.Tensor]) -> None:
    t["transformer.wte.weight"] = t["transformer.wte.weight"].to(torch.int32)


NOT_FINITE = "holds NaN or infinite values"
# case -> (the change, the tensor named, what is wrong with it)
BAD_TENSORS = {
    "nan": (nan_in_one, "transformer.h.1.attn.c_proj.weight", NOT_FINITE),
    "inf": (inf_in_one, "transformer.ln_f.bias", NOT_FINITE),
    "bool": (to_bool, "transformer.h.0.mlp.c_fc.bias", "is torch.bool, not a floating-point type"),
    "int": (to_int, "transformer.wte.weight", "is torch.int32, not a floating-point type"),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_import_refuses_weights_that_are_not_finite_floats(made, tmp_path, case):
    change, tensor, problem = BAD_TENSORS[case]
    folder = copy(made, "hf", tmp_path)
    edit_tensors(folder, change)
    with pytest.raises(LmpipeError) as error:
        import_model(folder, tmp_path / "out")
    one_line(error, f"{folder / 'model.safetensors'}: tensor {tensor} {problem}")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_pytorch_model_bin_holding_a_non_tensor_is_one_line(made, tmp_path):
    folder = copy(made, "hf", tmp_path)
    tensors = safetensors_torch.load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**tensors, "transformer.ln_f.bias": 5}, folder / "pytorch_model.bin")
    with pytest.raises(LmpipeError) as error:
        load_hf_model(folder)
    one_line(error, f"{folder / 'pytorch_model.bin'}: not a state dict (tensors by name)")


def test_an_index_without_a_weight_map_object_is_one_line_under_python_O(tmp_path):
    """The check is an `if`, not an assert that `python -O` strips (it gave an AttributeError
    traceback there)."""
    import subprocess
    import sys

    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ["x"]}')
    code = (
        "import sys; from pathlib import Path; from lmpipe.dataprep.errors import LmpipeError\n"
        "from lmpipe.train.hf import weight_files\n"
        "try: weight_files(Path(sys.argv[1]))\n"
        "except LmpipeError as e: print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-O", "-c", code, str(tmp_path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(
        "model.safetensors.index.json: not an index (a JSON object with a weight_map)"
    )
