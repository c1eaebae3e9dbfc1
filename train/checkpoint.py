"""A run folder's files, and the portable model a run leaves behind.

    run_dir/
      recipe.yaml, plan.json, deepspeed.json   what the run is (written at start)
      metrics.jsonl                            one line per optimizer step
      tensorboard/                             the same scalars as TensorBoard events (with the extra)
      logs/rank{r}.log                         every rank's log
      checkpoints/step{N:08d}/                 DeepSpeed checkpoints (model, optimizer, scheduler,
                                               plus lmpipe's loader position and the recipe)
      model/model.pt, model/recipe.yaml        the final weights as a plain fp32 state dict
      manifest.json                            written last: the run finished

`load_model` reads `model/` (or a checkpoint folder's exported weights) without DeepSpeed; a
recipe.yaml that claims a larger model than model.pt holds is refused before the model is built.

Nothing read from a run folder can run code. `model.pt` loads with `weights_only=True`. A
checkpoint's `lmpipe.json` (written last, the mark of a finished checkpoint; its format_version,
`MARKER_VERSION`, read up to this lmpipe's) lists the sha256 of every other file in it;
`--resume` checks them all (`verify_checkpoint`) before DeepSpeed opens any, and DeepSpeed's own
`torch.load` calls, which ask for the full unpickler, run under `weights_only_loading`:
weights-only unpickling with just the three DeepSpeed classes its checkpoints hold allowed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import (
    check_format_version,
    check_not_newer,
    sha256_file,
    write_json_atomic,
)
from lmpipe.train.model import GPT
from lmpipe.train.recipe import ModelConfig, Recipe, load_recipe, recipe_yaml

if TYPE_CHECKING:  # loop.py imports this module; the Run is only handed in
    from lmpipe.train.loop import Run

MODEL_DIR = "model"
CHECKPOINTS = "checkpoints"
MARKER = "lmpipe.json"  # a checkpoint's position and checksums; written last
# The marker's format (its `format_version`; none before 2026-12-08: 1), read up to this one:
# a newer lmpipe's checkpoint is refused in one line, not resumed as if understood. Keys an
# older reader may ignore keep the version (`read_marker` ignores unknown keys).
MARKER_VERSION = 1
# a block's tensors, and its MLP's output projection [d_model, d_ff], in lmpipe's names (BTLM's
# without "transformer.")
BLOCK = re.compile(r"h\.(\d+)\.")
MLP_OUT = re.compile(r"h\.\d+\.mlp\.c_proj\.weight")


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a checkpoint is finished once its `lmpipe.json` exists)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step") and (p / MARKER).is_file())


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
    try:
        torch.save(state, tmp)
    except RuntimeError as e:  # a short write (full disk, file-size limit): "unexpected pos ..."
        first = next(iter(str(e).strip().splitlines()), "")
        raise LmpipeError(f"{tmp}: cannot be written ({first})") from None
    (folder / "recipe.yaml").write_text(recipe_yaml(recipe), encoding="utf-8")
    tmp.replace(folder / "model.pt")


def model_folder(path: Path) -> Path:
    """The folder holding `model.pt` and `recipe.yaml`: a run folder's `model/`, or `path` itself."""
    path = Path(path)
    check_not_newer(path)  # a finished run's or an import's manifest
    folder = path / MODEL_DIR if (path / MODEL_DIR).is_dir() else path
    if not (folder / "model.pt").is_file() or not (folder / "recipe.yaml").is_file():
        raise LmpipeError(
            f"{path}: no trained model (model/model.pt and recipe.yaml); has the run finished?"
        )
    return folder


def oversize(
    cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], keys: dict[str, str]
) -> str | None:
    """The first of the model's sizes that exceeds what weights with these names and shapes
    (lmpipe's names, nn.Linear's [out, in]) hold, as `KEY VALUE: ...` with `keys` naming each
    ModelConfig field as its file does; None when none does. It reads names and shapes only, so
    it runs before a model is built: a recipe or config.json that claims 10^9 layers would
    otherwise build 10^9 modules, and 10^9 ids allocate a 10^9-row embedding. A model no larger
    than its file is left to the loading's own checks, which name the tensor. Blocks are counted
    as distinct indices (not the highest one), so no name makes the model larger than the file's
    tensors; n_heads divides d_model, which the embedding bounds."""
    blocks = {int(m.group(1)) for name in shapes if (m := BLOCK.match(name))}
    mlp = [s[1] for name, s in shapes.items() if MLP_OUT.fullmatch(name) and len(s) == 2]
    wte, wpe = shapes.get("wte.weight", ()), shapes.get("wpe.weight", ())
    # (field, the size the weights hold or None where they lack the tensor, that size in words)
    held: list[tuple[str, int | None, str]] = [
        ("n_layers", len(blocks), "block" if len(blocks) == 1 else "blocks"),
        ("vocab_size", wte[0] if len(wte) == 2 else None, "rows of wte.weight"),
        ("d_model", wte[1] if len(wte) == 2 else None, "columns of wte.weight"),
        ("d_ff", max(mlp, default=None), "columns of mlp.c_proj.weight"),
    ]
    if cfg.position == "learned":
        held.append(("n_positions", wpe[0] if len(wpe) == 2 else None, "rows of wpe.weight"))
    for field, size, what in held:
        claimed = getattr(cfg, field)
        if size is None:
            return f"{keys[field]} {claimed}: the weights hold no {what.split(' of ')[-1]}"
        if claimed > size:
            return f"{keys[field]} {claimed}: more than the weights hold ({size} {what})"
    return None


UNREADABLE = "unreadable or does not match the recipe"


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Recipe]:
    """A model folder's state dict, memory-mapped (nothing read until used), and its recipe,
    whose sizes are checked against the weights' shapes before anything is built."""
    weights = folder / "model.pt"
    recipe = load_recipe(str(folder / "recipe.yaml"))
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # whatever a damaged or foreign file makes torch raise
        raise LmpipeError(f"{weights}: {UNREADABLE} ({_why(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise LmpipeError(f"{weights}: {UNREADABLE} (not a state dict: tensors by name)")
    shapes = {str(name): tuple(t.shape) for name, t in state.items()}
    too_large = oversize(recipe.model, shapes, {f: f"model.{f}" for f in ModelConfig.model_fields})
    if too_large is not None:
        raise LmpipeError(f"{folder / 'recipe.yaml'}: {too_large} in {weights.name}")
    return state, recipe


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[GPT, Recipe]:
    """The model in a run folder (its `model/`) or in a folder that holds model.pt + recipe.yaml."""
    folder = model_folder(path)
    state, recipe = read_weights(folder)
    model = GPT(recipe.model)
    try:
        model.load_state_dict(state)
    except Exception as e:  # names or shapes that differ from the recipe's model
        raise LmpipeError(f"{folder / 'model.pt'}: {UNREADABLE} ({_why(e)})") from None
    return model.to(device).eval(), recipe


# --- checkpoints: checksums and weights-only loading ------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """The model `lmpipe eval MODEL` and `lmpipe generate MODEL` name: an lmpipe run or model folder (`model.pt` +
    `recipe.yaml`), or a Hugging Face folder (`config.json` + safetensors)."""

    path: Path
    kind: Literal["lmpipe", "hf"]

    def folder(self) -> Path:
        """The folder eval reads the model from (the output may not overlap it)."""
        if self.kind == "hf":
            return self.path
        return model_folder(self.path)

    def default_output(self) -> Path:
        """RUN_DIR/eval beside a run's model; `NAME-eval` beside a model folder NAME, which eval
        reads whole; `./NAME-eval` for a Hugging Face folder, which may be a shared, read-only
        download that no output belongs in."""
        if self.kind == "hf":
            return Path(f"{self.path.resolve().name}-eval")
        if self.folder() == self.path:  # resolved: a folder given as "." still has a name
            folder = self.path.resolve()
            return folder.parent / f"{folder.name}-eval"
        return self.path / "eval"

    def load(self, device: str | torch.device) -> tuple[GPT, Recipe]:
        if self.kind == "hf":
            from lmpipe.train.hf import load_hf_model  # imports safetensors: only when asked

            return load_hf_model(self.path, device)
        return load_model(self.path, device)


HF_PREFIX = "hf:"


def model_source(model: str | Path) -> ModelSource:
    """`hf:PATH` is a Hugging Face folder; otherwise a folder with lmpipe's model files is a run,
    one with a `config.json` a Hugging Face folder, and anything else an error naming it."""
    text = str(model)
    if text.startswith(HF_PREFIX):
        path = Path(text[len(HF_PREFIX) :])
        if not (path / "config.json").is_file():
            raise LmpipeError(f"{path}: no config.json, so not a Hugging Face model folder (hf:)")
        return ModelSource(path, "hf")
    path = Path(text)
    if any((folder / "model.pt").is_file() for folder in (path, path / "model")):
        return ModelSource(path, "lmpipe")
    if (path / "config.json").is_file():
        return ModelSource(path, "hf")
    raise LmpipeError(
        f"{path}: no trained model (model/model.pt and recipe.yaml) and no config.json of a "
        "Hugging Face model; has the run finished?"
    )


def checkpoint_files(folder: Path) -> list[str]:
    """Every file of a checkpoint folder but its marker, as sorted relative paths."""
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MARKER
    )


def hash_share(folder: Path, names: list[str], part: int, parts: int) -> dict[str, str]:
    """sha256 of every `parts`-th file from `part` on (ranks share the hashing of a checkpoint)."""
    return {name: sha256_file(folder / name) for name in names[part::parts]}


def read_marker(folder: Path) -> dict[str, Any]:
    """A checkpoint's marker: its position, the identity of its tokens (None for a checkpoint of
    an lmpipe before 2026-12-07, which kept none) and its files' sha256. One line for a marker
    of a newer lmpipe (`MARKER_VERSION`), of the oldest format (no checksums) or damaged."""
    path = folder / MARKER
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(marker, dict):
            raise TypeError("not a JSON object")
        check_format_version(path, marker.get("format_version"), MARKER_VERSION)
        if "files" not in marker and {"step", "tokens"} <= marker.keys():
            raise LmpipeError(
                f"{path}: written by an lmpipe from before 2026-11-30, whose checkpoints carry no "
                "checksums, so it is not loaded; finish this run with that lmpipe, or start a "
                "new run"
            )
        step, tokens, files = int(marker["step"]), int(marker["tokens"]), marker["files"]
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise TypeError("'files' is not a mapping of names to sha256")
        data = marker.get("data")  # absent from checkpoints written before it was kept
        if data is not None and not (
            isinstance(data, dict) and all(isinstance(v, str) for v in data.values())
        ):
            raise TypeError("'data' is not a mapping of source names to token identities")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LmpipeError(
            f"{path}: not a checkpoint marker with step, tokens and file checksums ({_why(e)}); "
            "the checkpoint cannot be verified, so it is not loaded"
        ) from None
    return {"step": step, "tokens": tokens, "data": data, "files": files}


def save_checkpoint(engine: Any, run: Run, step: int, tokens: int) -> None:
    """DeepSpeed checkpoint plus lmpipe's position, the sha256 of every file in it and
    `run.data`, the identity of the tokens each source read (`data.data_identity`); the marker
    `lmpipe.json` is written last and marks the checkpoint finished."""
    import torch.distributed as dist

    run_dir, recipe, rank, world, data = run.run_dir, run.recipe, run.rank, run.world, run.data
    root = run_dir / CHECKPOINTS
    tag = step_tag(step)
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state={"step": step, "tokens": tokens})
    except RuntimeError as e:  # torch.save's short write (a full disk): "unexpected pos ..."
        first = next(iter(str(e).strip().splitlines()), "")
        raise LmpipeError(f"{root / tag}: cannot be written ({first})") from None
    if rank == 0:
        (root / tag / "recipe.yaml").write_text(recipe_yaml(recipe), encoding="utf-8")
    dist.barrier()
    names = checkpoint_files(root / tag)
    shares: list[dict[str, str]] = [{}] * world
    dist.all_gather_object(shares, hash_share(root / tag, names, rank, world))
    if rank == 0:
        files = {name: digest for share in shares for name, digest in share.items()}
        marker = {
            "format_version": MARKER_VERSION,
            "step": step,
            "tokens": tokens,
            "data": data,
            "files": dict(sorted(files.items())),
        }
        write_json_atomic(root / tag / MARKER, marker)
        for old in list_checkpoints(run_dir)[: -recipe.keep_checkpoints]:
            shutil.rmtree(old)
        # A checkpoint a crash left unfinished (no marker) is never loaded; once a later one is
        # finished, nothing will write it again (a resume may change the interval): its disk
        # space goes back.
        for torn in root.glob("step*"):
            if torn.is_dir() and torn.name < tag and not (torn / MARKER).is_file():
                shutil.rmtree(torn)
    dist.barrier()


def verify_checkpoint(folder: Path, part: int = 0, parts: int = 1) -> dict[str, Any]:
    """Check a checkpoint against its marker: the same files, and (this rank's share of) their
    sha256. Returns the marker; an `LmpipeError` naming the file otherwise."""
    marker = read_marker(folder)
    listed, present = sorted(marker["files"]), checkpoint_files(folder)
    extra = sorted(set(present) - set(listed))
    missing = sorted(set(listed) - set(present))
    if extra or missing:
        name, how = (
            (extra[0], "is not listed in") if extra else (missing[0], "is missing but listed in")
        )
        raise LmpipeError(f"{folder / name}: {how} {MARKER} (tampered or incomplete checkpoint)")
    for name, digest in hash_share(folder, listed, part, parts).items():
        if digest != marker["files"][name]:
            raise LmpipeError(
                f"{folder / name}: sha256 differs from {MARKER} (corrupted or tampered checkpoint)"
            )
    return marker


def deepspeed_checkpoint_classes() -> list[type]:
    """The classes, besides tensors and containers, that DeepSpeed 0.19's checkpoints pickle
    (ZeRO 0-3, fp32 and bf16: each file loaded with weights_only=True and every global that
    stopped it collected)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """Make every `torch.load` in the block unpickle weights-only, even one that asks for the
    full unpickler (DeepSpeed's checkpoint loader passes weights_only=False): torch reads
    TORCH_FORCE_WEIGHTS_ONLY_LOAD at each call. Only DeepSpeed's own checkpoint classes are
    allowed besides what weights-only loading allows anyway."""
    names = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {name: os.environ.pop(name, None) for name in names}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        # torch annotates a list of callables, invariant, where any list of classes serves
        with torch.serialization.safe_globals(deepspeed_checkpoint_classes()):  # type: ignore[arg-type]
            yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def load_checkpoint(engine: Any, folder: Path) -> dict[str, Any]:
    """DeepSpeed's state from a verified checkpoint folder, weights-only; the client state."""
    try:
        with weights_only_loading():
            _, client = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    except Exception as e:  # a file that unpickles to the wrong shapes fails deep in DeepSpeed
        raise LmpipeError(f"{folder}: cannot be loaded as a safe checkpoint ({_why(e)})") from None
    if not isinstance(client, dict) or type(client.get("step")) is not int:
        raise LmpipeError(f"{folder}: holds no lmpipe position (an integer 'step')")
    return client


def _why(e: BaseException) -> str:
    """One line for an exception; for a refused global, the global's name."""
    text = str(e)
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if refused:
        return f"it would unpickle {refused.group(1)}, which lmpipe does not allow"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
