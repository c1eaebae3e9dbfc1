"""A run folder's files, and the portable model a run leaves behind.

    run_dir/
      recipe.yaml, plan.json, deepspeed.json   what the run is (written at start)
      metrics.jsonl                            one line per optimizer step
      logs/rank{r}.log                         every rank's log
      checkpoints/step{N:08d}/                 DeepSpeed checkpoints (model, optimizer, scheduler,
                                               plus lmpipe's loader position and the recipe)
      model/model.pt, model/recipe.yaml        the final weights as a plain fp32 state dict
      manifest.json                            written last: the run finished

`load_model` reads `model/` (or a checkpoint folder's exported weights) without DeepSpeed.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.train.model import GPT
from lmpipe.train.recipe import Recipe, recipe_yaml, validate_recipe

MODEL_DIR = "model"
CHECKPOINTS = "checkpoints"


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a checkpoint is finished once its `lmpipe.json` exists)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if p.name.startswith("step") and (p / "lmpipe.json").is_file()
    )


def save_model(
    model: torch.nn.Module,
    recipe: Recipe,
    folder: Path,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write fp32 weights (`state`, or the model's own) and the recipe; the weights file is
    complete before its final name appears."""
    folder.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = model.state_dict()
    state = {k: v.detach().float().cpu() for k, v in state.items()}
    tmp = folder / "model.pt.tmp"
    torch.save(state, tmp)
    (folder / "recipe.yaml").write_text(recipe_yaml(recipe), encoding="utf-8")
    tmp.replace(folder / "model.pt")


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[GPT, Recipe]:
    """The model in a run folder (its `model/`) or in a folder that holds model.pt + recipe.yaml."""
    path = Path(path)
    folder = path / MODEL_DIR if (path / MODEL_DIR).is_dir() else path
    weights, recipe_file = folder / "model.pt", folder / "recipe.yaml"
    if not weights.is_file() or not recipe_file.is_file():
        raise LmpipeError(
            f"{path}: no trained model (model/model.pt and recipe.yaml); has the run finished?"
        )
    recipe = validate_recipe(
        yaml.safe_load(recipe_file.read_text(encoding="utf-8")), str(recipe_file)
    )
    model = GPT(recipe.model)
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except (RuntimeError, EOFError) as e:
        raise LmpipeError(
            f"{weights}: unreadable or does not match the recipe ({str(e).splitlines()[0]})"
        ) from None
    return model.to(device).eval(), recipe
