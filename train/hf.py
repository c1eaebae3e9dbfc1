"""Hugging Face interop: lmpipe's models out as BTLM-layout folders, BTLM and GPT-2-layout
folders in as lmpipe models.

The portable model is a folder in the layout of Cerebras' BTLM-3B-8K release (seeds-spec 1.1-1.2):
`model.safetensors` (or shards with `model.safetensors.index.json`) holding
`transformer.wte.weight`, `transformer.h.{i}.{ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.c_fc,
mlp.c_fc2,mlp.c_proj}.*`, `transformer.ln_f.*`, `transformer.relative_pe.slopes` [n_heads, 1]
(ALiBi) or `transformer.wpe.weight` (learned positions), projection weights in GPT-2's Conv1D
orientation [in, out] and the head tied to `wte` (not stored); `config.json` with BTLM's fields
(`mup_*`, `alibi_scaling`) and an `auto_map` to `modeling_btlm.py`, a copy of
`lmpipe.train.hf_modeling`, for `trust_remote_code`; `generation_config.json`; GPT-2's
tokenizer files. The config's fields are `hf_config.py`'s, the tokenizer's `hf_tokenizer.py`'s;
this module moves the weights and holds the stages.

  export_model   a run's (or model folder's) weights -> such a folder, fp32 or bf16
  load_hf_model  such a folder, the released BTLM or Cerebras-GPT-muP (`model_type: btlm`, new or
                 old field names) or a GPT-2-layout one (Cerebras-GPT SP) -> lmpipe's GPT + recipe
  import_model   load_hf_model, written as a folder laid out like a finished run's (model/),
                 which `lmpipe eval` and `train --init-from` read; a dynamic alibi_scaling,
                 which no recipe holds, is noted on stderr as not kept
  initial_model  the weights `lmpipe train --init-from` starts from, checked against the recipe

What lmpipe cannot run is refused in one line naming the field or tensor: another architecture,
an activation other than SwiGLU and exact GELU, GPT-2's layer-index scaling or reordered
attention, untied embeddings, non-standard ALiBi slopes, missing, extra or misshapen tensors,
tensors that are not floating point or hold NaN or infinities, a vocabulary or tokenizer that is
not GPT-2's. A config.json that claims more blocks or wider tensors than the weight files hold is
refused from the files' names and shapes, before any model is built. Dropout fields are read and
not used: lmpipe trains and evaluates without dropout, as BTLM and Cerebras-GPT did (their
configs set 0).

Reading needs only safetensors (the `hf` extra) and json, never transformers; nothing read can
run code (`pytorch_model.bin` loads weights-only).
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import (
    check_not_newer,
    sha256_file,
    staged_output,
    umask_mode,
    write_manifest,
)
from lmpipe.dataprep.tokenizer import EOT_ID, VOCAB_SIZE
from lmpipe.train.checkpoint import (
    MODEL_DIR,
    UNREADABLE,
    load_model,
    model_folder,
    oversize,
    read_weights,
    save_model,
)
from lmpipe.train.hf_config import (
    CONFIG_KEYS,
    MODELING_FILE,
    hf_config,
    imported_recipe,
    read_config,
)
from lmpipe.train.hf_tokenizer import check_tokenizer, gpt2_tokenizer_files, write_tokenizer
from lmpipe.train.model import GPT, alibi_slopes, fp32_copy
from lmpipe.train.recipe import ModelConfig, Recipe

SLOPES = "transformer.relative_pe.slopes"
# Weights stored [in, out] (GPT-2's Conv1D) in the HF layout, [out, in] (nn.Linear) in lmpipe's.
CONV1D = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_fc2|mlp\.c_proj)\.weight")
# GPT-2 checkpoints may carry their causal-mask buffers; they hold no weights.
MASK_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def safetensors_torch() -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise LmpipeError(
            "Hugging Face folders need safetensors: pip install 'lmpipe[hf]'"
        ) from None
    return safetensors.torch


# --- lmpipe -> HF -----------------------------------------------------------------------------


def lmpipe_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Recipe]:
    """A model folder's state dict (memory-mapped) and recipe, checked against each other as
    `checkpoint.load_model` checks them, but without initialising a model whose weights would
    all be overwritten (half a minute of random numbers at 3B)."""
    state, recipe = read_weights(folder)  # sizes checked: the model below is that of the file
    with torch.device("meta"):
        model = GPT(recipe.model)
    try:
        model.load_state_dict(state, strict=True, assign=True)  # names and shapes
    except Exception as e:  # names or shapes that differ from the recipe's model
        first = next(iter(str(e).strip().splitlines()), "")
        raise LmpipeError(
            f"{folder / 'model.pt'}: {UNREADABLE} ({type(e).__name__}: {first})"
        ) from None
    return state, recipe


def hf_tensors(
    state: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """lmpipe's weights under BTLM's names and orientation; the slopes stay float32."""
    tensors = {}
    for name, tensor in state.items():
        if CONV1D.fullmatch(name):
            tensor = tensor.t()
        tensors[f"transformer.{name}"] = tensor.detach().to("cpu", dtype).contiguous()
    if cfg.position == "alibi":
        tensors[SLOPES] = alibi_slopes(cfg.n_heads)[:, None].contiguous()
    return tensors


def write_safetensors(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """`model.safetensors`, or shards of at most `max_shard_bytes` (a tensor larger than that
    gets a shard of its own) named as transformers names them, with their index."""
    save_file = safetensors_torch().save_file
    from safetensors import SafetensorError

    def save(part: dict[str, torch.Tensor], path: Path) -> None:
        try:
            save_file(part, str(path), metadata={"format": "pt"})
        except SafetensorError as e:  # a full disk, a file-size limit: it names no file
            raise LmpipeError(f"{path}: cannot be written ({e})") from None
        # safetensors creates its file 0600 whatever the umask: readable by its owner alone, so
        # a teammate or a serving account could not load the export; give it the umask's mode.
        path.chmod(umask_mode())

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save(tensors, folder / "model.safetensors")
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save(shard, folder / file)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def export_model(
    model_path: Path,
    out: Path,
    dtype: str = "fp32",
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 10**9,
) -> Path:
    """Write the model of a run folder (or model folder) as a BTLM-layout Hugging Face folder
    that `AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)` loads."""
    if dtype not in DTYPES:
        raise LmpipeError(f"--dtype {dtype!r}: fp32 or bf16")
    if max_shard_bytes <= 0:
        raise LmpipeError(f"max_shard_bytes {max_shard_bytes}: must be positive")
    folder = model_folder(Path(model_path))
    gpt2_tokenizer_files()  # fail before anything is written
    state, recipe = lmpipe_weights(folder)
    if recipe.model.vocab_size != VOCAB_SIZE:
        raise LmpipeError(
            f"{folder}: model.vocab_size {recipe.model.vocab_size}; the export carries GPT-2's "
            f"tokenizer ({VOCAB_SIZE} ids)"
        )
    config = hf_config(recipe, dtype)
    with staged_output(Path(out), stage="export", reads=[folder], overwrite=overwrite) as work:
        write_safetensors(work, hf_tensors(state, recipe.model, DTYPES[dtype]), max_shard_bytes)
        (work / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        generation = {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID}
        (work / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        modeling = resources.files("lmpipe.train").joinpath("hf_modeling.py").read_text("utf-8")
        (work / MODELING_FILE).write_text(modeling, encoding="utf-8")
        write_tokenizer(work, config["n_positions"])
        files = sorted(p.name for p in work.iterdir() if p.is_file() and not p.name.startswith("."))
        write_manifest(
            work,
            "export",
            source=str(folder),
            recipe=recipe.name,
            dtype=dtype,
            files={name: sha256_file(work / name) for name in files},
        )
    return Path(out)


# --- HF -> lmpipe -----------------------------------------------------------------------------


def weight_files(folder: Path) -> tuple[dict[str, Path], str]:
    """Each stored tensor's file, from the first of: a safetensors index, model.safetensors, a
    pytorch_model.bin index, pytorch_model.bin; and that file's name, for messages."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError  # a check, not an assert: `python -O` keeps it
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise LmpipeError(
                    f"{index}: not an index (a JSON object with a weight_map)"
                ) from None
            files = {}
            for name, file in weight_map.items():
                # a plain file name beside the index: nothing is read from elsewhere
                if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
                    raise LmpipeError(f"{index}: tensor {name} is mapped to {file!r}, not a file name")  # fmt: skip
                if not (folder / file).is_file():
                    raise LmpipeError(f"{index}: tensor {name} is in {file}, which is missing")
                files[name] = folder / file
            return files, index_name
        if (folder / single).is_file():
            return {}, single
    raise LmpipeError(f"{folder}: no model.safetensors, pytorch_model.bin or index of either")


def open_tensors(folder: Path, stack: contextlib.ExitStack) -> dict[str, tuple[Path, Any]]:
    """Every stored tensor: name -> (file, a loader of it). Safetensors files stay open in
    `stack`, so shapes come from their headers and each tensor is read only when asked for."""
    files, source = weight_files(folder)
    tensors: dict[str, tuple[Path, Any]] = {}
    for path in sorted(set(files.values())) or [folder / source]:
        wanted = {n for n, p in files.items() if p == path} if files else None
        try:
            with open(path, "rb"):
                pass  # safetensors calls a file it may not open "No such file or directory"
        except OSError as e:
            raise LmpipeError(f"{path}: cannot be read ({e.strerror})") from None
        if path.suffix == ".safetensors":
            safetensors_torch()  # installed, or a one-line error
            from safetensors import SafetensorError, safe_open

            try:
                f = stack.enter_context(safe_open(str(path), framework="pt"))
                stored = {name: f.get_slice(name) for name in f.keys()}
            except SafetensorError as e:
                raise LmpipeError(f"{path}: not a readable safetensors file ({e})") from None
        else:
            try:
                stored = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # whatever a foreign or damaged file makes torch raise
                first = next(iter(str(e).strip().splitlines()), "")
                raise LmpipeError(
                    f"{path}: not a weights-only loadable state dict ({type(e).__name__}: {first})"
                ) from None
            # tensors by name: their shapes are read before anything else
            if not isinstance(stored, dict) or not all(
                isinstance(name, str) and isinstance(t, torch.Tensor) for name, t in stored.items()
            ):
                raise LmpipeError(f"{path}: not a state dict (tensors by name)")
        for name in sorted(wanted or stored):
            if name not in stored:
                raise LmpipeError(f"{path}: holds no tensor {name}, which its index maps to it")
            if name in tensors:
                raise LmpipeError(f"{path}: tensor {name} is stored twice")
            tensors[name] = (path, stored[name])
    return tensors


def shape_of(loader: Any) -> tuple[int, ...]:
    return tuple(loader.get_shape()) if hasattr(loader, "get_shape") else tuple(loader.shape)


def tensor_of(loader: Any) -> torch.Tensor:
    return loader[:] if hasattr(loader, "get_shape") else loader


def convert_state(
    folder: Path,
    cfg: ModelConfig,
    expected: dict[str, torch.Size],
    tensors: dict[str, tuple[Path, Any]],
) -> dict[str, torch.Tensor]:
    # lmpipe's name -> (the stored name, its file, its loader); GPT-2's own checkpoints name
    # their tensors without the "transformer." prefix
    stored: dict[str, tuple[str, Path, Any]] = {}
    for name, (path, loader) in tensors.items():
        key = name.removeprefix("transformer.")
        if MASK_BUFFERS.fullmatch(key):
            continue
        if key in stored:
            raise LmpipeError(f"{path}: tensor {name} is stored twice (with and without 'transformer.')")  # fmt: skip
        stored[key] = (name, path, loader)
    wanted = {k: torch.Size(reversed(s)) if CONV1D.fullmatch(k) else s for k, s in expected.items()}
    if cfg.position == "alibi":
        wanted["relative_pe.slopes"] = torch.Size([cfg.n_heads, 1])
    head = stored.pop("lm_head.weight", None)
    missing = sorted(set(wanted) - set(stored))
    extra = sorted(set(stored) - set(wanted))
    if missing:
        raise LmpipeError(
            f"{folder}: tensor transformer.{missing[0]} is missing ({len(missing)} missing in all)"
        )
    if extra:
        name, path, _ = stored[extra[0]]
        raise LmpipeError(
            f"{path}: tensor {name} is not part of the model config.json describes "
            f"({len(extra)} extra in all)"
        )
    for key, shape in wanted.items():
        name, path, loader = stored[key]
        if shape_of(loader) != tuple(shape):
            raise LmpipeError(
                f"{path}: tensor {name} has shape {list(shape_of(loader))}, "
                f"config.json gives {list(shape)}"
            )
    if cfg.position == "alibi":
        name, path, loader = stored.pop("relative_pe.slopes")
        found, standard = tensor_of(loader).float().flatten(), alibi_slopes(cfg.n_heads)
        # bf16 checkpoints round the slopes; anything further off is another ALiBi
        if not torch.allclose(found, standard, rtol=1e-2, atol=0):
            raise LmpipeError(
                f"{path}: tensor {name} holds {found.tolist()[:3]}..., not ALiBi's standard slopes "
                "(lmpipe computes its own)"
            )
    state = {}
    for key, (name, path, loader) in stored.items():
        tensor = tensor_of(loader)
        # A weight stored as integers or booleans, or holding NaN or inf, would load and compute
        # nonsense (generation repeating one token) without a word.
        if not tensor.is_floating_point():
            raise LmpipeError(f"{path}: tensor {name} is {tensor.dtype}, not a floating-point type")
        if not bool(torch.isfinite(tensor).all()):
            raise LmpipeError(f"{path}: tensor {name} holds NaN or infinite values")
        tensor = tensor.float()
        state[key] = tensor.t().contiguous() if CONV1D.fullmatch(key) else tensor
    if head is not None:
        name, path, loader = head
        same_shape = shape_of(loader) == tuple(expected["wte.weight"])
        if not same_shape or not torch.equal(tensor_of(loader).float(), state["wte.weight"]):
            raise LmpipeError(
                f"{path}: tensor {name} differs from the token embedding; lmpipe ties the head "
                "to it (untied embeddings)"
            )
    return state


def load_hf_model(path: Path, device: str | torch.device = "cpu") -> tuple[GPT, Recipe]:
    """lmpipe's GPT (float32, eval mode) and a recipe from a BTLM- or GPT-2-layout folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise LmpipeError(f"{folder}: no such folder")
    check_not_newer(folder)  # an lmpipe export's manifest
    imported = read_config(folder)
    check_tokenizer(folder)
    cfg = imported.model
    with contextlib.ExitStack() as stack:
        tensors = open_tensors(folder, stack)
        # The sizes config.json claims, against the stored shapes, before a model is built
        # (on meta, where only the number of blocks and of ALiBi's heads cost anything).
        shapes = {
            name.removeprefix("transformer."): shape_of(loader)
            for name, (_, loader) in tensors.items()
        }
        shapes = {k: shape[::-1] if CONV1D.fullmatch(k) else shape for k, shape in shapes.items()}
        too_large = oversize(cfg, shapes, CONFIG_KEYS)
        if too_large is not None:
            raise LmpipeError(f"{folder / 'config.json'}: {too_large}")
        with torch.device("meta"):  # shapes only: the loaded tensors become the parameters
            model = GPT(cfg)
        expected = {name: t.shape for name, t in model.state_dict().items()}
        # lmpipe's float32 state dict from the folder's tensors, every name and shape checked first
        state = convert_state(folder, cfg, expected, tensors)
    model.load_state_dict(state, strict=True, assign=True)
    model.slopes = alibi_slopes(cfg.n_heads)  # a buffer no state dict holds
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]  # fmt: skip
    if leftover:  # a bug: GPT grew a tensor that neither the state dict nor this code fills
        raise RuntimeError(f"load_hf_model left {leftover} unset")
    return model.to(device).eval(), imported_recipe(folder.resolve().name, imported)


def import_model(hf: Path, out: Path, overwrite: bool = False) -> Path:
    """A Hugging Face folder as an lmpipe folder laid out like a finished run's: `model/model.pt`
    and `model/recipe.yaml`, and a manifest; `lmpipe eval OUT` (results in OUT/eval by default)
    and `lmpipe train --init-from OUT` read it."""
    hf = Path(hf)
    model, recipe = load_hf_model(hf)
    with staged_output(Path(out), stage="import", reads=[hf], overwrite=overwrite) as work:
        save_model(model, recipe, work / MODEL_DIR)
        files = [f"{MODEL_DIR}/model.pt", f"{MODEL_DIR}/recipe.yaml"]
        write_manifest(
            work,
            "import",
            source=str(hf),
            recipe=recipe.name,
            parameters=sum(p.numel() for p in model.parameters()),
            files={name: sha256_file(work / name) for name in files},
        )
    if read_config(hf).dynamic_alibi:  # load_hf_model has read and checked this config
        note_dynamic_alibi(hf / "config.json", recipe.stages[-1].seq_len, Path(out))
    return Path(out)


def note_dynamic_alibi(config: Path, train_seq_len: int, out: Path) -> None:
    """One line on stderr: a dynamic alibi_scaling is an inference-time rule that a recipe
    cannot hold (a stage holds a fixed alibi_scale), so a re-export would drop it unsaid and
    transformers would then score inputs past train_seq_len without interpolation."""
    print(
        f"note: {config}: alibi_scaling's dynamic rule (train_seq_len {train_seq_len}) is not "
        f"kept: the model is imported as trained at {train_seq_len} tokens; past them `lmpipe "
        "generate` applies the rule by default, `lmpipe eval` in long_context (loss_alibi_pi) or "
        f"at a fixed --alibi-scale; `lmpipe export` of {out} writes alibi_scaling null (set the "
        "rule again in the export's config.json for transformers to apply it)",
        file=sys.stderr,
    )


# --- lmpipe train --init-from ------------------------------------------------------------------

# The fields that decide what a set of weights computes: a recipe that differs in any of them
# cannot start from those weights (shapes) or would compute another function with them (the rest).
SAME_MODEL_FIELDS = ("n_layers", "n_heads", "d_model", "d_ff", "vocab_size", "position", "mlp")


def model_difference(recipe: ModelConfig, weights: ModelConfig) -> str | None:
    """The first field in which a recipe's model differs from the weights' model, with both
    values; None when the weights fit."""
    pairs: list[tuple[str, Any, Any]] = [
        (field, getattr(recipe, field), getattr(weights, field)) for field in SAME_MODEL_FIELDS
    ]
    if weights.position == "learned":
        pairs.append(("n_positions", recipe.n_positions, weights.n_positions))
    pairs.append(("layer_norm_eps", recipe.layer_norm_eps, weights.layer_norm_eps))
    mine, theirs = forward_multipliers(recipe), forward_multipliers(weights)
    pairs += [(field, mine[field], theirs[field]) for field in mine]
    for field, a, b in pairs:
        if a != b:
            return f"model.{field} ({a!r} in the recipe, {b!r} in the weights)"
    return None


def forward_multipliers(cfg: ModelConfig) -> dict[str, Any]:
    """muP's numbers that enter the forward pass (1 and sqrt(d_head) under SP)."""
    mup = cfg.mup
    if mup is None:
        return {"mup.alpha_in": 1.0, "mup.alpha_out / m_d": 1.0, "mup.qk_scale": "sqrt_d_head"}
    return {
        "mup.alpha_in": round(mup.alpha_in, 9),
        "mup.alpha_out / m_d": round(mup.alpha_out * mup.d_model_base / cfg.d_model, 9),
        "mup.qk_scale": mup.qk_scale,
    }


def initial_model(path: Path, recipe: Recipe) -> GPT:
    """The model `lmpipe train --init-from PATH` starts from: a Hugging Face folder (with a
    config.json) or an lmpipe run or model folder, checked to be the recipe's model."""
    path = Path(path)
    if (path / "config.json").is_file():
        model, _ = load_hf_model(path)
    else:
        model, _ = load_model(path)
    difference = model_difference(recipe.model, model.cfg)
    if difference is not None:
        raise LmpipeError(f"--init-from {path}: the recipe's model differs at {difference}")
    return model


def start_from(model: GPT, initial: GPT) -> None:
    """Copy `initial`'s weights into a freshly built model of the same recipe. A sparse recipe
    takes its masks from the weights' zeros (the masks those weights were trained with), so
    sparse training continues where it stopped; weights with another density are refused.
    Parameters are written one at a time through `fp32_copy`, so a model that ZeRO-3 holds
    partitioned (built inside deepspeed.zero.Init) takes them too."""
    state = initial.state_dict()
    if model.cfg.density < 1:
        for name, _ in model.named_parameters():
            if not model.is_hidden(name):
                continue
            dropped = state[name] == 0
            kept = dropped.numel() - int(dropped.sum())
            keep = round(model.cfg.density * dropped.numel())
            if kept != keep:
                raise LmpipeError(
                    f"--init-from: {name} holds {kept} non-zero "
                    f"weights; the recipe's model.density {model.cfg.density:g} keeps {keep}"
                )
            # GPT.sparsify's mask buffer of this weight, which its gradient hook reads
            getattr(model, name.replace(".", "_") + "_dropped").copy_(dropped)
    for name, p in model.named_parameters():
        with fp32_copy(p) as w:
            w.copy_(state[name])
