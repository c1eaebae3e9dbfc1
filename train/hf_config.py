"""BTLM's config.json in lmpipe's terms, both ways (seeds-spec 1.2, 3.3).

`hf_config` writes a recipe's model with BTLM's fields: mup_width_scale = 1/m_d =
d_model_base/d_model, mup_embeddings_scale = alpha_in, mup_output_alpha = alpha_out,
mup_scale_qk_dot_by_d from qk_scale (SP: 1, 1, 1, false), initializer_range = sigma_base (or
init_std), n_positions = the last stage's length for ALiBi, alibi_scaling {"type": "linear",
"factor": s} for a last stage that trained with alibi_scale s > 1. A learned-position model's
n_positions is its table's size, which may exceed the last stage's length: `lmpipe_train_seq_len`
holds that length, so an import reads windows of what the model trained at, as its run's eval
does (a folder without the field, e.g. one exported before it existed: n_positions).

`read_config` reads any BTLM config (lmpipe's, the released BTLM's, including the first upload's
field names, Cerebras-GPT-muP's intermediate checkpoints) or a GPT-2 one (Cerebras-GPT SP) back
into a `ModelConfig`, refusing in one line what lmpipe's GPT cannot compute; `imported_recipe`
gives it a recipe.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import is_int, is_number
from lmpipe.dataprep.tokenizer import EOT_ID, VOCAB_SIZE
from lmpipe.train.recipe import ModelConfig, MupConfig, Recipe, load_recipe, validate_recipe

# The exported folder's modeling code (a copy of lmpipe.train.hf_modeling) and its classes.
MODELING_FILE = "modeling_btlm.py"
AUTO_MAP = {
    "AutoConfig": "modeling_btlm.BTLMConfig",
    "AutoModel": "modeling_btlm.BTLMModel",
    "AutoModelForCausalLM": "modeling_btlm.BTLMLMHeadModel",
}
# config.json's key for each field of lmpipe's ModelConfig and MupConfig (built apart, so its
# fields come without "mup."), for messages
CONFIG_KEYS = {
    "n_layers": "n_layer",
    "n_heads": "n_head",
    "d_model": "n_embd",
    "d_ff": "n_inner",
    "vocab_size": "vocab_size",
    "n_positions": "n_positions",
    "layer_norm_eps": "layer_norm_epsilon",
    "init_std": "initializer_range",
    "sigma_base": "initializer_range",
    "d_model_base": "mup_width_scale",
    "d_ff_base": "mup_width_scale",
    "alpha_in": "mup_embeddings_scale",
    "alpha_out": "mup_output_alpha",
}
# lmpipe's own config.json field: a learned-position model's training length (n_positions is
# the size of its position table).
TRAIN_SEQ_LEN_FIELD = "lmpipe_train_seq_len"


def hf_config(recipe: Recipe, dtype: str) -> dict[str, Any]:
    """BTLM's config.json fields for a recipe's model (seeds-spec 1.2, 3.3)."""
    cfg, last = recipe.model, recipe.stages[-1]
    mup = cfg.mup
    learned = cfg.position == "learned"
    return {
        "architectures": ["BTLMLMHeadModel"],
        "auto_map": AUTO_MAP,
        "model_type": "btlm",
        "vocab_size": cfg.vocab_size,
        # ALiBi has no position table: n_positions is the length it last trained at.
        "n_positions": cfg.n_positions if learned else last.seq_len,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.d_ff,
        "activation_function": cfg.mlp,
        "position_embedding_type": cfg.position,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": mup.sigma_base if mup else cfg.init_std or cfg.SP_INIT_STD,
        "scale_attn_weights": True,
        "mup_width_scale": mup.d_model_base / cfg.d_model if mup else 1.0,  # 1 / m_d
        "mup_embeddings_scale": mup.alpha_in if mup else 1.0,
        "mup_output_alpha": mup.alpha_out if mup else 1.0,
        "mup_scale_qk_dot_by_d": mup is not None and mup.qk_scale == "d_head",
        "alibi_scaling": (
            {"type": "linear", "factor": last.alibi_scale} if last.alibi_scale > 1 else None
        ),
        "use_cache": True,
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16" if dtype == "bf16" else "float32",
        **({TRAIN_SEQ_LEN_FIELD: last.seq_len} if learned else {}),
    }


class HFConfig:
    """config.json's fields, read with their types; every error names the file and the field."""

    def __init__(self, path: Path):
        self.path = path
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LmpipeError(f"{path}: no such file (not a Hugging Face model folder)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LmpipeError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise LmpipeError(f"{path}: not a JSON object")
        self.raw = raw

    def error(self, field: str, value: Any, why: str) -> LmpipeError:
        return LmpipeError(f"{self.path}: {field} {value!r}: {why}")

    def get(self, field: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if field not in self.raw or (self.raw[field] is None and default is not ...):
            if default is ...:
                raise LmpipeError(f"{self.path}: no {field} field")
            return default
        value = self.raw[field]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and is_int(value):
            try:
                value = float(value)
            except OverflowError:  # an integer past float's range, which JSON allows
                raise self.error(field, value, "too large") from None
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise self.error(field, value, f"expected {' or '.join(k.__name__ for k in kinds)}")
        return value

    def positive(self, field: str, default: Any = ...) -> int:
        value = self.get(field, int, default)
        if value <= 0:
            raise self.error(field, value, "must be positive")
        return value

    def finite_positive(self, field: str, value: float) -> float:
        # JSON as Python reads it allows NaN and Infinity, which no comparison with 0 refuses.
        if not (math.isfinite(value) and value > 0):
            raise self.error(field, value, "must be a finite number above 0")
        return value

    def require(self, field: str, wanted: Any, default: Any, why: str) -> None:
        value = self.get(field, type(wanted), default)
        if value != wanted:
            raise self.error(field, value, why)


@dataclass(frozen=True)
class Imported:
    """What a config.json says in lmpipe's terms: the model, and the length and ALiBi scale of
    the stage it last trained at. `dynamic_alibi`: its alibi_scaling was the dynamic rule, whose
    train_seq_len is `seq_len`; no recipe field holds the rule, so an export of the import
    writes alibi_scaling null (`lmpipe import` says so)."""

    model: ModelConfig
    seq_len: int
    alibi_scale: float
    dynamic_alibi: bool


def read_config(folder: Path) -> Imported:
    config = HFConfig(folder / "config.json")
    model_type = config.get("model_type", str, "")
    if model_type not in ("btlm", "gpt2"):
        raise config.error(
            "model_type", model_type, "lmpipe reads BTLM ('btlm') and GPT-2-layout ('gpt2') models"
        )
    btlm = model_type == "btlm"
    vocab_size = config.positive("vocab_size")
    if vocab_size != VOCAB_SIZE:
        raise config.error("vocab_size", vocab_size, f"lmpipe's tokenizer is GPT-2's ({VOCAB_SIZE} ids)")  # fmt: skip
    d_model, n_heads = config.positive("n_embd"), config.positive("n_head")
    n_layers, n_positions = config.positive("n_layer"), config.positive("n_positions")
    if d_model % n_heads:
        raise config.error("n_embd", d_model, f"not divisible by n_head ({n_heads})")
    d_ff = config.positive("n_inner", 4 * d_model)
    mlp = config.get("activation_function", str, "gelu_new")
    if mlp not in (("swiglu", "gelu") if btlm else ("gelu",)):
        raise config.error(
            "activation_function", mlp, "lmpipe runs swiglu (BTLM) and gelu (exact erf GELU)"
        )
    position = config.get("position_embedding_type", str, "learned") if btlm else "learned"
    if position not in ("alibi", "learned"):
        raise config.error("position_embedding_type", position, "lmpipe runs alibi or learned")
    config.require("scale_attn_weights", True, True, "lmpipe always scales q.k")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):  # fmt: skip
        config.require(flag, False, False, "lmpipe's attention has no such option")
    config.require("tie_word_embeddings", True, True, "lmpipe ties the head to the embedding")
    width = config.get("mup_width_scale", float, None)
    width = config.get("width_scale", float, 1.0) if width is None else width
    alpha_in = config.get("mup_embeddings_scale", float, None)
    alpha_in = config.get("embeddings_scale", float, 1.0) if alpha_in is None else alpha_in
    alpha_out = config.get("mup_output_alpha", float, None)
    if alpha_out is None:  # the first BTLM upload stored alpha_out * width_scale
        alpha_out = config.get("output_logits_scale", float, width) / width
    by_d = config.get("mup_scale_qk_dot_by_d", bool, None)
    by_d = config.get("scale_qk_dot_by_d", bool, False) if by_d is None else by_d
    for field, value in (
        ("mup_width_scale", width),
        ("mup_embeddings_scale", alpha_in),
        ("mup_output_alpha", alpha_out),
    ):
        config.finite_positive(field, value)
    sigma = config.get("initializer_range", float, ModelConfig.SP_INIT_STD)
    config.finite_positive("initializer_range", sigma)
    eps = config.finite_positive(
        "layer_norm_epsilon", config.get("layer_norm_epsilon", float, 1e-5)
    )
    sp = (width, alpha_in, alpha_out, by_d) == (1.0, 1.0, 1.0, False)
    seq_len, alibi_scale, dynamic_alibi = n_positions, 1.0, False
    if position == "learned":
        seq_len = config.positive(TRAIN_SEQ_LEN_FIELD, n_positions)
        if seq_len > n_positions:
            raise config.error(
                TRAIN_SEQ_LEN_FIELD, seq_len, f"longer than the {n_positions} learned positions"
            )
    scaling = config.get("alibi_scaling", dict, None) if btlm else None
    if scaling is not None:
        if position != "alibi":
            raise config.error("alibi_scaling", scaling, "needs position_embedding_type alibi")
        factor, train_seq_len = scaling.get("factor"), scaling.get("train_seq_len")
        if len(scaling) != 2 or scaling.get("type") != "linear":
            raise config.error(
                "alibi_scaling", scaling, "expected type linear with factor or train_seq_len"
            )
        if is_number(factor) and factor > 1:
            alibi_scale = float(factor)  # a fixed interpolation the model was fine-tuned with
        elif is_int(train_seq_len) and train_seq_len > 1:
            # Dynamic interpolation is an inference-time rule on top of a model trained at
            # train_seq_len: lmpipe's eval applies it by length (long_context, --alibi-scale).
            seq_len, dynamic_alibi = train_seq_len, True
        else:
            raise config.error(
                "alibi_scaling", scaling, "factor must be > 1, train_seq_len an integer > 1"
            )
    try:
        mup = None
        if not sp:
            # muP's base shapes from the width multiplier: d_model_base = d_model / m_d (the FFN
            # shares the multiplier; lmpipe requires it).
            mup = MupConfig(
                d_model_base=round(d_model * width, 6),
                d_ff_base=round(d_ff * width, 6),
                sigma_base=sigma,
                alpha_in=alpha_in,
                alpha_out=alpha_out,
                qk_scale="d_head" if by_d else "sqrt_d_head",
            )
        model = ModelConfig(
            n_layers=n_layers,
            n_heads=n_heads,
            d_model=d_model,
            d_ff=d_ff,
            vocab_size=vocab_size,
            layer_norm_eps=eps,
            position=position,
            n_positions=n_positions,
            mlp=mlp,
            mup=mup,
            init_std=sigma if sp else None,
        )
    except ValidationError as e:  # for values no field check above covers
        # pydantic's message for the first error, under config.json's key: its last line is a
        # link that names neither. A check across fields (ModelConfig's) has no location.
        error = e.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        if not where:
            raise LmpipeError(f"{config.path}: {error['msg']}") from None
        key = CONFIG_KEYS.get(where.rpartition(".")[2], where)
        if key in config.raw:  # the file's value; a field derived from it named with its own
            derived = config.raw[key] != error["input"]
            why = f"gives {where} {error['input']!r}: {error['msg']}" if derived else error["msg"]
            raise config.error(key, config.raw[key], why) from None
        raise LmpipeError(f"{config.path}: {where} {error['input']!r}: {error['msg']}") from None
    return Imported(model, seq_len, alibi_scale, dynamic_alibi)


def imported_recipe(name: str, imported: Imported) -> Recipe:
    """The model with training sections from a shipped recipe (BTLM's for muP, Cerebras-GPT
    111M's for SP) and one stage at the length it last trained at: what `lmpipe eval` reads,
    and a start for `lmpipe train --init-from` (which takes its own recipe)."""
    model = imported.model
    base = load_recipe("btlm3b" if model.mup else "cerebras-gpt-111m")
    seq_len = imported.seq_len
    step = seq_len * max(1, base.tokens_per_step // seq_len)
    raw = {
        **base.model_dump(mode="json"),
        "name": name,
        "model": model.model_dump(mode="json"),
        "stages": [{"seq_len": seq_len, "tokens": step, "alibi_scale": imported.alibi_scale}],
        "tokens_per_step": step,
        "micro_batch_tokens": seq_len,
        "checkpoint_every_tokens": step,
    }
    return validate_recipe(raw, f"recipe for {name}")
