"""A BTLM-layout causal language model for Hugging Face transformers: the configuration and the
model that `lmpipe export` folders carry for `trust_remote_code` (copied there as
`modeling_btlm.py`).

It implements exactly the field set of Cerebras' BTLM-3B-8K release (seeds-spec 1.2), so one
class reads lmpipe's exports, the released BTLM weights and Cerebras-GPT-muP's intermediate
checkpoints (which are stored as `model_type: btlm`):
  - pre-LayerNorm blocks, fused q/k/v `c_attn`, biases everywhere but the head, no dropout, the
    language-model head tied to the token embedding;
  - positions: ALiBi (slopes stored as `transformer.relative_pe.slopes`, [n_head, 1]) or learned
    `wpe`, whose position ids count the attention mask's ones, so left-padded batches work;
  - ALiBi position interpolation, `alibi_scaling` (seeds-spec 2): every slope divided by a fixed
    `factor`, or by key_len / train_seq_len once the keys (cached ones included) outnumber
    `train_seq_len`;
  - muP (seeds-spec 1.3): h0 = mup_embeddings_scale * (wte + wpe); q.k / d_head when
    mup_scale_qk_dot_by_d, else / sqrt(d_head); logits = lm_head(h) * mup_output_alpha *
    mup_width_scale;
  - the MLP: SwiGLU, c_proj(c_fc(x) * silu(c_fc2(x))), or the exact (erf) GELU;
  - projection weights in GPT-2's Conv1D orientation, [in, out], as BTLM's files store them.
It takes transformers' Cache objects (DynamicCache), so `generate` decodes incrementally.

Standalone on purpose: it imports only the standard library, torch and transformers, never
lmpipe, because it runs inside transformers' remote-code loader on machines that have no lmpipe.
It works with the `cache` keyword of transformers 5 and the `past_key_values` one of earlier
releases.

Shapes: B batch, T new tokens (queries), S keys (cached plus new), H heads, Dh head size,
D n_embd, F n_inner, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

# transformers 5 renamed the outputs' `past_key_values` to `cache`; fill whichever exists.
_CACHE_FIELD = (
    "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
)


class BTLMConfig(PretrainedConfig):
    model_type = "btlm"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    def __init__(
        self,
        vocab_size: int = 50257,
        n_positions: int = 1024,
        n_embd: int = 768,
        n_layer: int = 12,
        n_head: int = 12,
        n_inner: int | None = None,
        activation_function: str = "gelu",
        position_embedding_type: str = "learned",
        layer_norm_epsilon: float = 1e-5,
        initializer_range: float = 0.02,
        scale_attn_weights: bool = True,
        mup_width_scale: float = 1.0,
        mup_embeddings_scale: float = 1.0,
        mup_output_alpha: float = 1.0,
        mup_scale_qk_dot_by_d: bool = False,
        alibi_scaling: dict | None = None,
        use_cache: bool = True,
        bos_token_id: int = 50256,
        eos_token_id: int = 50256,
        tie_word_embeddings: bool = True,
        **kwargs: Any,  # a config.json's other fields, as transformers' own config takes them
    ) -> None:
        # The released BTLM config's first upload named the muP fields without `mup_`, and
        # stored the product alpha_out * width_scale as `output_logits_scale`.
        mup_width_scale = kwargs.pop("width_scale", mup_width_scale)
        mup_embeddings_scale = kwargs.pop("embeddings_scale", mup_embeddings_scale)
        mup_scale_qk_dot_by_d = kwargs.pop("scale_qk_dot_by_d", mup_scale_qk_dot_by_d)
        if "output_logits_scale" in kwargs:
            mup_output_alpha = kwargs.pop("output_logits_scale") / mup_width_scale
        if activation_function not in ("swiglu", "gelu"):
            raise ValueError(
                f"activation_function {activation_function!r}: this model runs 'swiglu' or 'gelu' "
                "(the exact erf GELU)"
            )
        if position_embedding_type not in ("alibi", "learned"):
            raise ValueError(
                f"position_embedding_type {position_embedding_type!r}: 'alibi' or 'learned'"
            )
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if kwargs.get(flag):
                raise ValueError(f"{flag}: true is not implemented by this model")
        check_alibi_scaling(alibi_scaling)
        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_inner = n_inner
        self.activation_function = activation_function
        self.position_embedding_type = position_embedding_type
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.scale_attn_weights = scale_attn_weights
        self.mup_width_scale = mup_width_scale
        self.mup_embeddings_scale = mup_embeddings_scale
        self.mup_output_alpha = mup_output_alpha
        self.mup_scale_qk_dot_by_d = mup_scale_qk_dot_by_d
        self.alibi_scaling = alibi_scaling
        self.use_cache = use_cache
        # transformers 5 declares only its own fields (these three reach it through **kwargs,
        # which its wrapped __init__ accepts); 4.x declares them
        super().__init__(  # type: ignore[call-arg]
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )


def check_alibi_scaling(scaling: dict | None) -> None:
    """None, {"type": "linear", "factor": f > 1} or {"type": "linear", "train_seq_len": n > 1}."""
    if scaling is None:
        return
    if not isinstance(scaling, dict) or len(scaling) != 2 or scaling.get("type") != "linear":
        raise ValueError(
            f"alibi_scaling {scaling!r}: expected {{'type': 'linear', 'factor': f}} or "
            "{'type': 'linear', 'train_seq_len': n}"
        )
    if "factor" in scaling:
        factor = scaling["factor"]
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not factor > 1:
            raise ValueError(f"alibi_scaling.factor {factor!r}: a number > 1")
    elif "train_seq_len" in scaling:
        length = scaling["train_seq_len"]
        if isinstance(length, bool) or not isinstance(length, int) or not length > 1:
            raise ValueError(f"alibi_scaling.train_seq_len {length!r}: an integer > 1")
    else:
        raise ValueError(f"alibi_scaling {scaling!r}: needs 'factor' or 'train_seq_len'")


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Press et al.'s slopes 2^(-8h/n), h = 1..n; for a head count that is not a power of two,
    the series of the power of two below it plus every other slope of the series for twice that."""

    def series(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    closest = 2 ** math.floor(math.log2(n_head))
    slopes = series(closest) + series(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes, dtype=torch.float32)


class Conv1D(nn.Module):
    """A linear layer whose weight is stored [in, out] (GPT-2's orientation, kept by BTLM's files)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class AlibiSlopes(nn.Module):
    """ALiBi's head slopes as a frozen parameter [H, 1], under the name BTLM's files use."""

    def __init__(self, n_head: int):
        super().__init__()
        self.slopes = nn.Parameter(alibi_slopes(n_head)[:, None], requires_grad=False)


class BTLMAttention(nn.Module):
    def __init__(self, config: BTLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.d_head = config.n_head, config.n_embd // config.n_head
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)
        # muP divides q.k by d_head: q and k grow correlated with width, so their dot product
        # grows like d_head rather than sqrt(d_head).
        if not config.scale_attn_weights:
            self.scale = 1.0
        elif config.mup_scale_qk_dot_by_d:
            self.scale = 1.0 / self.d_head
        else:
            self.scale = self.d_head**-0.5

    def forward(
        self, x_BTD: torch.Tensor, bias_BHTS: torch.Tensor, cache: Cache | None
    ) -> torch.Tensor:
        B, T, D = x_BTD.shape
        q, k, v = self.c_attn(x_BTD).split(D, dim=2)
        q_BHTd, k_BHTd, v_BHTd = (
            t.view(B, T, self.n_head, self.d_head).transpose(1, 2) for t in (q, k, v)
        )
        if cache is not None:  # keys and values of every earlier token, then these
            k_BHTd, v_BHTd = cache.update(k_BHTd, v_BHTd, self.layer_idx)
        y_BHTd = F.scaled_dot_product_attention(
            q_BHTd, k_BHTd, v_BHTd, attn_mask=bias_BHTS, scale=self.scale
        )
        return self.c_proj(y_BHTd.transpose(1, 2).reshape(B, T, D))


class BTLMMLP(nn.Module):
    def __init__(self, config: BTLMConfig):
        super().__init__()
        d_ff = config.n_inner or 4 * config.n_embd
        self.swiglu = config.activation_function == "swiglu"
        self.c_fc = Conv1D(config.n_embd, d_ff)
        if self.swiglu:
            self.c_fc2 = Conv1D(config.n_embd, d_ff)  # the gate
        self.c_proj = Conv1D(d_ff, config.n_embd)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.c_proj(self.c_fc(x_BTD) * F.silu(self.c_fc2(x_BTD)))
        return self.c_proj(F.gelu(self.c_fc(x_BTD)))


class BTLMBlock(nn.Module):
    def __init__(self, config: BTLMConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = BTLMAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = BTLMMLP(config)

    def forward(
        self, x_BTD: torch.Tensor, bias_BHTS: torch.Tensor, cache: Cache | None
    ) -> torch.Tensor:
        x_BTD = x_BTD + self.attn(self.ln_1(x_BTD), bias_BHTS, cache)
        return x_BTD + self.mlp(self.ln_2(x_BTD))


class BTLMPreTrainedModel(PreTrainedModel):
    config_class = BTLMConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["BTLMBlock"]
    # The slopes stay float32 when the rest loads in half precision (non-power-of-two head
    # counts have slopes that bf16 would round).
    _keep_in_fp32_modules = ["relative_pe"]
    _keep_in_fp32_modules_strict = ["relative_pe"]
    _supports_cache_class = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """A fresh model's weights (a loaded one keeps its own): normal(initializer_range)
        matrices, zero biases, unit LayerNorms, Press et al.'s slopes."""
        std = self.config.initializer_range
        if isinstance(module, Conv1D):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, AlibiSlopes):
            module.slopes.copy_(alibi_slopes(self.config.n_head)[:, None])


class BTLMModel(BTLMPreTrainedModel):
    def __init__(self, config: BTLMConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.alibi = config.position_embedding_type == "alibi"
        if self.alibi:
            self.relative_pe = AlibiSlopes(config.n_head)
        else:
            self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(BTLMBlock(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    # transformers types the argument nn.Module; what it passes back (resize_token_embeddings)
    # is the nn.Embedding that get_input_embeddings returned, resized
    def set_input_embeddings(self, embeddings: nn.Embedding) -> None:  # type: ignore[override]
        self.wte = embeddings

    def alibi_scale(self, S: int) -> float:
        """The interpolation factor for S keys: a fixed factor, or S / train_seq_len past it."""
        scaling = self.config.alibi_scaling
        if scaling is None:
            return 1.0
        if "factor" in scaling:
            return float(scaling["factor"])
        return max(1.0, S / scaling["train_seq_len"])

    def attention_bias(
        self, attention_mask: torch.Tensor | None, T: int, S: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """The additive mask [B or 1, H or 1, T, S]: ALiBi's -slope * (i - j), and the dtype's
        lowest value where a key lies in the future or is padding. Finite rather than -inf, so a
        padding query that may see nothing gets a harmless uniform row instead of NaN."""
        device = self.wte.weight.device
        i = torch.arange(S - T, S, device=device)[:, None]  # the queries are the last T keys
        j = torch.arange(S, device=device)[None, :]
        allowed_1TS = (j <= i)[None]
        if attention_mask is not None:
            allowed_1TS = allowed_1TS & attention_mask[:, None, :].bool()
        if self.alibi:
            slopes_H11 = self.relative_pe.slopes.float().view(-1, 1, 1) / self.alibi_scale(S)
            bias = -slopes_H11 * (i - j).float()
        else:
            bias = torch.zeros(1, T, S, device=device)
        bias = bias[None].to(dtype)
        return bias.masked_fill(~allowed_1TS[:, None], torch.finfo(dtype).min)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        **kwargs: object,  # what else generate passes (output_attentions, ...): not used
    ) -> BaseModelOutputWithPast | tuple:
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache()
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError(f"the cache must be a transformers Cache, not {type(cache).__name__}")
        B, T, _ = inputs_embeds.shape
        past = cache.get_seq_length() if cache is not None else 0
        S = past + T
        if attention_mask is not None and (
            attention_mask.dim() != 2 or attention_mask.shape[1] != S
        ):
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)}: expected [batch, {S}] (the cached "
                "tokens and these)"
            )
        x_BTD = inputs_embeds
        if not self.alibi:
            if position_ids is None:
                if attention_mask is not None:  # count real tokens: left padding starts at 0
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
                else:
                    position_ids = torch.arange(past, S, device=x_BTD.device)[None]
            x_BTD = x_BTD + self.wpe(position_ids)
        x_BTD = x_BTD * self.config.mup_embeddings_scale
        bias = self.attention_bias(attention_mask, T, S, x_BTD.dtype)
        for block in self.h:
            x_BTD = block(x_BTD, bias, cache)
        x_BTD = self.ln_f(x_BTD)
        cache = cache if use_cache else None
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if not return_dict:
            return (x_BTD, cache)
        # the cache field's name depends on the transformers version (_CACHE_FIELD)
        return BaseModelOutputWithPast(last_hidden_state=x_BTD, **{_CACHE_FIELD: cache})  # type: ignore[arg-type]


class BTLMLMHeadModel(BTLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: BTLMConfig):
        super().__init__(config)
        self.transformer = BTLMModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # muP's output multiplier: alpha_out / m_d, with mup_width_scale = 1 / m_d.
        self.output_scale = config.mup_output_alpha * config.mup_width_scale
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    # transformers types the argument nn.Module; what it passes back (resize_token_embeddings)
    # is the nn.Embedding that get_input_embeddings returned, resized
    def set_input_embeddings(self, embeddings: nn.Embedding) -> None:  # type: ignore[override]
        self.transformer.wte = embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, embeddings: nn.Linear) -> None:
        self.lm_head = embeddings

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: object,  # the rest of generate's model kwargs: only use_cache is read
    ) -> dict:
        """One decoding step's inputs: the tokens the cache has not seen, and the mask over all.
        (Defined here because transformers before 4.46 has no generic one.)"""
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            input_ids = input_ids[:, cache.get_seq_length() :]
        return {
            "input_ids": input_ids,
            "past_key_values": cache,
            "attention_mask": attention_mask,
            "use_cache": kwargs.get("use_cache", True),
        }

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        **kwargs: object,  # what else generate passes (output_attentions, ...): not used
    ) -> CausalLMOutputWithPast | tuple:
        """Logits [B, T, V]; with `labels`, the mean next-token cross-entropy (labels are the
        inputs: shifted here, -100 ignored)."""
        hidden, cache = self.transformer(
            input_ids,
            past_key_values=cache if cache is not None else past_key_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=False,
        )
        logits_BTV = self.lm_head(hidden) * self.output_scale
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits_BTV[:, :-1].flatten(0, 1).float(),
                labels[:, 1:].flatten().to(logits_BTV.device),
                ignore_index=-100,
            )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if not return_dict:
            return (logits_BTV, cache) if loss is None else (loss, logits_BTV, cache)
        # the cache field's name depends on the transformers version (_CACHE_FIELD)
        return CausalLMOutputWithPast(loss=loss, logits=logits_BTV, **{_CACHE_FIELD: cache})  # type: ignore[arg-type]
