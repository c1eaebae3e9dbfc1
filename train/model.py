"""The GPT of BTLM-3B-8K and Cerebras-GPT: pre-LayerNorm, tied embeddings, biases, no dropout;
ALiBi or learned positions, SwiGLU or GELU; muP or the standard parametrisation (SP).

Read top to bottom: ALiBi slopes, the KV cache of generation, attention (two kernels that
compute the same thing), the MLP, the block, the model, then the initialisation and per-group
learning rates. The losses are `loss.py`'s.

Three settings change how the model trains, never what it computes:
  - `loss_impl: chunked`: the training loss without the [B*T, V] float32 logits (1.6 GB for one
    8,192-token sequence), `loss_chunk_tokens` rows at a time (`chunked_cross_entropy`);
  - `compile: blocks`: each block goes through torch.compile on its own (regional compilation),
    and so does the chunked loss's softmax work;
  - `activation_checkpointing: full | every_N`: blocks recompute their activations in the backward
    pass instead of keeping them (a third more compute, for when memory is short).
The first two are `auto` by default: on for CUDA; off on CPUs, where the plain loss is the tests'
reference and compiling costs more than it saves.

BTLM (seeds-spec 1.1) is ALiBi + SwiGLU; Cerebras-GPT (seeds-spec 3.2) learned positions + GELU
(4 d_model). muP as Cerebras trained both (seeds-spec 1.3, 3.3), with the width multiplier
m_d = d_model / d_model_base and the FFN multiplier m_ffn = d_ff / d_ff_base:
  - embedding output (token plus position embeddings) multiplied by alpha_in (width independent);
  - logits multiplied by alpha_out / m_d ("scale by d", not sqrt(d));
  - attention logits divided by d_head instead of sqrt(d_head);
  - hidden init std sigma_base / sqrt(m_d); residual-output projections further / sqrt(2 n_layers)
    (the FFN down projection uses m_ffn); the embeddings (token and position) keep sigma_base;
  - Adam learning rate of hidden matrices eta_base / m_d (FFN down: eta_base / m_ffn); embeddings,
    biases and LayerNorms keep eta_base.
SP (`mup: null`) is the same model with every multiplier 1: init std `init_std` (0.02) for every
matrix, / sqrt(2 n_layers) for residual-output projections, q.k / sqrt(d_head), one learning rate.

Shapes: B batch, T sequence (query) length, S key length, H heads, d head size (d_model /
n_heads), D d_model, F d_ff, V vocabulary, N = B*T tokens flattened.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from lmpipe.train.loss import chunked_cross_entropy
from lmpipe.train.recipe import ModelConfig


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Press et al.'s head slopes: a geometric series 2^(-8h/n) for h = 1..n (0.8409 ... 0.0039 at
    32 heads); for a head count that is not a power of two, the power-of-two series below it plus
    every other slope of the series for twice that count."""

    def series(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = series(closest) + series(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes_H: torch.Tensor, T: int, S: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias [H, T, S]: -slope * (i - j) on and below the diagonal, -inf above.
    Queries are the last T of S positions (S > T when scoring a continuation of a cached prefix)."""
    i = torch.arange(S - T, S, device=slopes_H.device)[:, None]
    j = torch.arange(S, device=slopes_H.device)[None, :]
    distance_TS = (i - j).to(torch.float32)
    bias = -slopes_H[:, None, None] * distance_TS
    bias = bias.masked_fill(j > i, float("-inf"))
    return bias.to(dtype)


class KVCache:
    """One layer's keys and values of the tokens seen so far, for generation: each forward pass
    then runs only the new tokens. Buffers [B, H, max_len, d] are allocated at the first append
    and written in place, so a step costs no copy of the whole cache.

    ALiBi's bias is added to the scores, not baked into K, so a pass at a new (dynamic) ALiBi
    scale reads the cached keys as they are. Past the first layer they come from hidden states
    of the pass that made them, at that pass's scale: each token keeps the scale of its own step,
    as in BTLM's Hugging Face code with a cache (a full forward at the new scale would differ)."""

    def __init__(self, max_len: int):
        self.max_len, self.length = max_len, 0
        self.k_BHSd: torch.Tensor | None = None
        self.v_BHSd: torch.Tensor | None = None

    def append(
        self, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys and values; return all of them so far, [B, H, S, d]."""
        B, H, T, d = k_BHTd.shape
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions cannot take {T} more")
        if self.k_BHSd is None or self.v_BHSd is None:
            self.k_BHSd = k_BHTd.new_empty(B, H, self.max_len, d)
            self.v_BHSd = v_BHTd.new_empty(B, H, self.max_len, d)
        S = self.length + T
        self.k_BHSd[:, :, self.length : S] = k_BHTd
        self.v_BHSd[:, :, self.length : S] = v_BHTd
        self.length = S
        return self.k_BHSd[:, :, :S], self.v_BHSd[:, :, :S]


class Attention(nn.Module):
    """Causal self-attention with ALiBi. Two kernels compute the same function:
    `sdpa` adds an explicit [H, T, T] bias (works everywhere, memory quadratic in T), `flex`
    applies the bias inside FlexAttention's score_mod with a causal block mask (fast on GPU, but
    has no backward pass on the CPU). tests/train/test_model.py checks they agree. `decode` is
    the same attention for generation, over a KV cache."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # fused Q, K, V (BTLM's c_attn)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)
        # muP: q.k / d_head keeps attention logits O(1) as width grows (q and k become correlated).
        by_d = cfg.mup is not None and cfg.mup.qk_scale == "d_head"
        self.scale = 1.0 / self.d_head if by_d else self.d_head**-0.5

    def heads(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K, V [B, H, T, d] from the fused projection."""
        B, T, D = x_BTD.shape
        q, k, v = self.c_attn(x_BTD).split(D, dim=2)
        q_BHTd, k_BHTd, v_BHTd = (
            t.view(B, T, self.n_heads, self.d_head).transpose(1, 2) for t in (q, k, v)
        )
        return q_BHTd, k_BHTd, v_BHTd

    def forward(
        self, x_BTD: torch.Tensor, slopes_H: torch.Tensor | None, impl: str
    ) -> torch.Tensor:
        """`slopes_H`: ALiBi's slopes, or None for a model with learned positions (plain causal)."""
        B, T, D = x_BTD.shape
        q_BHTd, k_BHTd, v_BHTd = self.heads(x_BTD)
        if slopes_H is None:  # no bias: SDPA's causal flash kernel on every device
            y_BHTd = F.scaled_dot_product_attention(
                q_BHTd, k_BHTd, v_BHTd, is_causal=True, scale=self.scale
            )
        elif impl == "flex":
            y_BHTd = flex_alibi_attention(q_BHTd, k_BHTd, v_BHTd, slopes_H, self.scale)
        else:
            bias_HTT = alibi_bias(slopes_H, T, T, q_BHTd.dtype)
            y_BHTd = F.scaled_dot_product_attention(
                q_BHTd, k_BHTd, v_BHTd, attn_mask=bias_HTT, scale=self.scale
            )
        return self.c_proj(y_BHTd.transpose(1, 2).reshape(B, T, D))

    def decode(
        self, x_BTD: torch.Tensor, slopes_H: torch.Tensor | None, cache: KVCache
    ) -> torch.Tensor:
        """Attention for generation: the T new tokens' keys and values join the cache, and their
        queries, the last T of S positions, attend over all S keys (SDPA with an explicit [H, T,
        S] bias or mask, on every device)."""
        B, T, D = x_BTD.shape
        q_BHTd, k_BHTd, v_BHTd = self.heads(x_BTD)
        k_BHSd, v_BHSd = cache.append(k_BHTd, v_BHTd)
        S = k_BHSd.shape[2]
        if slopes_H is None:  # SDPA's is_causal aligns the diagonal top-left: wrong when T < S
            mask_TS = torch.ones(T, S, dtype=torch.bool, device=x_BTD.device).tril(S - T)
        else:
            mask_TS = alibi_bias(slopes_H, T, S, q_BHTd.dtype)
        y_BHTd = F.scaled_dot_product_attention(
            q_BHTd, k_BHSd, v_BHSd, attn_mask=mask_TS, scale=self.scale
        )
        return self.c_proj(y_BHTd.transpose(1, 2).reshape(B, T, D))


_block_masks: dict[tuple[int, str], object] = {}
_compiled: dict[str, Callable[..., Any]] = {}


@torch.compiler.disable
def flex_alibi_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes_H: torch.Tensor, scale: float
) -> torch.Tensor:
    """FlexAttention with ALiBi as a score_mod and a causal block mask.

    The compiled kernel is specialised to the sequence length, so lengths are padded up to a
    power of two (at least 128): training uses one or two lengths, but evaluation batches come in
    every length, and each new one would recompile (Dynamo gives up after 8 and falls back to an
    unfused kernel that materialises the scores). Padding sits after the real positions, where
    the causal mask hides it from every real query, and is cut off the output.

    A compiled block (`compile: blocks`) calls this as it is, outside its own graph: the kernel
    is compiled here already, and the block-mask cache is Python state Dynamo should not trace."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T, device = q.shape[2], q.device
    T_pad = max(128, 1 << (T - 1).bit_length())
    if T_pad != T:
        q, k, v = (F.pad(t, (0, 0, 0, T_pad - T)) for t in (q, k, v))

    def alibi(
        score: torch.Tensor,
        b: torch.Tensor,
        h: torch.Tensor,
        q_idx: torch.Tensor,
        kv_idx: torch.Tensor,
    ) -> torch.Tensor:
        return score - slopes_H[h] * (q_idx - kv_idx)

    def causal(
        b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        return q_idx >= kv_idx

    key = (T_pad, str(device))
    if key not in _block_masks:  # block masks depend only on the (bucketed) length
        _block_masks[key] = create_block_mask(causal, None, None, T_pad, T_pad, device=device)
    kernel: Callable[..., Any] = flex_attention
    if device.type == "cuda":  # compiled, FlexAttention fuses the bias into one flash-style kernel
        kernel = _compiled.setdefault("flex", torch.compile(flex_attention, dynamic=False))
    out = kernel(q, k, v, score_mod=alibi, block_mask=_block_masks[key], scale=scale)
    return out[:, :, :T]


class MLP(nn.Module):
    """SwiGLU as BTLM wires it: c_proj(c_fc(x) * silu(c_fc2(x))), c_fc2 being the gate; or
    Cerebras-GPT's GELU MLP, c_proj(gelu(c_fc(x))) (GPT-2's layout, exact erf GELU)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.c_fc2 = nn.Linear(cfg.d_model, cfg.d_ff) if cfg.mlp == "swiglu" else None
        self.c_proj = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if self.c_fc2 is None:
            return self.c_proj(F.gelu(self.c_fc(x_BTD)))
        return self.c_proj(self.c_fc(x_BTD) * F.silu(self.c_fc2(x_BTD)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x_BTD: torch.Tensor,
        slopes_H: torch.Tensor | None,
        impl: str,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        h_BTD = self.ln_1(x_BTD)
        if cache is None:
            x_BTD = x_BTD + self.attn(h_BTD, slopes_H, impl)
        else:  # generation: the cached tokens' keys and values too
            x_BTD = x_BTD + self.attn.decode(h_BTD, slopes_H, cache)
        return x_BTD + self.mlp(self.ln_2(x_BTD))


class GPT(nn.Module):
    slopes: torch.Tensor  # a buffer (register_buffer): typed here, as nn.Module types it loosely

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # Learned absolute positions (Cerebras-GPT), or ALiBi's fixed slopes, not trained: a
        # buffer moves with the model to its device.
        self.wpe = nn.Embedding(cfg.n_positions, cfg.d_model) if cfg.position == "learned" else None
        self.register_buffer("slopes", alibi_slopes(cfg.n_heads), persistent=False)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        mup = cfg.mup  # None: SP, every muP multiplier 1
        self.m_d = cfg.d_model / mup.d_model_base if mup else 1.0
        self.m_ffn = cfg.d_ff / mup.d_ff_base if mup else 1.0
        self.alpha_in = mup.alpha_in if mup else 1.0
        self.alpha_out = mup.alpha_out if mup else 1.0
        # torch.compile's wrappers of the blocks (`compiled_blocks`), made at the first training
        # pass that uses them: a plain list, so the state dict and `.to()` see only `self.h`.
        self.compiled_h: list[Callable[..., torch.Tensor]] = []
        self.reset_parameters()

    def attention_impl(self, device: torch.device) -> str:
        impl = self.cfg.attn_impl
        if impl == "auto":
            return "flex" if device.type == "cuda" else "sdpa"
        return impl

    def loss_impl(self, device: torch.device) -> str:
        impl = self.cfg.loss_impl
        if impl == "auto":
            return "chunked" if device.type == "cuda" else "plain"
        return impl

    def compiles(self, device: torch.device) -> bool:
        """Whether training compiles its blocks (`compiled_blocks`) and the chunked loss's softmax
        work. `auto`: on CUDA, but not for a model partitioned by ZeRO-3, whose per-module
        gathering hooks Dynamo does not trace reliably (pytorch/pytorch#115484)."""
        if self.cfg.compile == "auto":
            return device.type == "cuda" and not hasattr(self.wte.weight, "ds_id")
        return self.cfg.compile == "blocks"

    def compiled_blocks(self) -> list[Callable[..., torch.Tensor]]:
        """The blocks each compiled on its own, regional compilation: the blocks are alike, so
        Dynamo makes one graph for all of them, and compile time is one block's, whatever
        n_layers. Shapes are static: a run has one or two sequence lengths, each compiled once.
        Only training uses them: evaluation's and generation's lengths change from call to call."""
        if not self.compiled_h:
            self.compiled_h = [torch.compile(block, dynamic=False) for block in self.h]
        return self.compiled_h

    def new_cache(self, max_len: int) -> list[KVCache]:
        """An empty KV cache, one per layer, for sequences of at most `max_len` tokens."""
        return [KVCache(max_len) for _ in self.h]

    def hidden_states(
        self, idx_BT: torch.Tensor, alibi_scale: float = 1.0, cache: list[KVCache] | None = None
    ) -> torch.Tensor:
        """The last hidden states [B, T, D], already times muP's output multiplier alpha_out / m_d
        (applied to the D-wide state rather than the V-wide logits: the same product, V/D times
        cheaper), so that logits are `unembed(hidden_states(idx))`.

        `alibi_scale` > 1 is ALiBi position interpolation (seeds-spec 2): every slope divided by
        the scale, i.e. distances shrunk by it, so a model trained at length L reads s * L tokens.

        With a `cache` (from `new_cache`), `idx_BT` continues the tokens already cached: they are
        positions past..past+T-1, and the cache takes their keys and values.

        A training pass (gradients on, no cache) runs the blocks compiled (`compiles`) and with
        activation checkpointing, as the recipe's model section says.
        """
        past = cache[0].length if cache else 0
        x_BTD = self.wte(idx_BT)
        slopes_H = None
        if self.wpe is None:
            slopes_H = self.slopes / alibi_scale
        else:
            T = idx_BT.shape[1]
            if past + T > self.cfg.n_positions:
                raise ValueError(
                    f"{past + T} tokens exceed the {self.cfg.n_positions} learned positions"
                )
            x_BTD = x_BTD + self.wpe(torch.arange(past, past + T, device=idx_BT.device))
        x_BTD = x_BTD * self.alpha_in  # muP's alpha_in: on the sum, as Cerebras' BTLM class does
        impl = self.attention_impl(idx_BT.device)
        training = cache is None and torch.is_grad_enabled()
        compiled = training and self.compiles(idx_BT.device)
        blocks: Iterable[Callable[..., torch.Tensor]] = (
            self.compiled_blocks() if compiled else self.h
        )
        every = self.cfg.checkpoint_every if training else 0
        for i, block in enumerate(blocks):
            if every and i % every == 0:  # keep the block's input; recompute the rest in backward
                x_BTD = torch.utils.checkpoint.checkpoint(
                    block, x_BTD, slopes_H, impl, use_reentrant=False
                )
            else:
                x_BTD = block(x_BTD, slopes_H, impl, cache[i] if cache else None)
        return self.ln_f(x_BTD) * (self.alpha_out / self.m_d)

    def unembed(self, x_D: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] (float32) from hidden states [..., D] (any leading dimensions), through
        the tied embedding."""
        return F.linear(x_D, self.wte.weight).float()

    def forward(
        self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None, alibi_scale: float = 1.0
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits [B, T, V] (float32) and, with targets, the token-mean cross-entropy (IGNORE
        targets count for nothing). Under the chunked loss (`loss_impl`), a call with targets
        returns None for the logits: not forming them is the point; `model(idx)` gives them."""
        x_BTD = self.hidden_states(idx_BT, alibi_scale)
        if targets_BT is not None and self.loss_impl(idx_BT.device) == "chunked":
            x_ND, target_N = x_BTD.flatten(0, 1), targets_BT.flatten()
            chunk, compiled = self.cfg.loss_chunk_tokens, self.compiles(idx_BT.device)
            return None, chunked_cross_entropy(x_ND, self.wte.weight, target_N, chunk, compiled)
        logits_BTV = self.unembed(x_BTD)
        if targets_BT is None:
            return logits_BTV, None
        return logits_BTV, F.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten())

    # --- muP initialisation and learning rates ---------------------------------------------

    def is_hidden(self, name: str) -> bool:
        """The attention and FFN projection matrices: muP's hidden weights, sparse muP's sparse ones."""
        return name.startswith("h.") and name.endswith("weight") and ".ln_" not in name

    def width_multiplier(self, name: str) -> float:
        """m_d (m_ffn for the FFN down projection), times sparse muP's density multiplier m_rho:
        a sparse layer behaves like a dense one of width d * rho (seeds-spec 4); without
        `mup.sparse_correction`, m_d alone (uncorrected muP, for comparison). 1 under SP."""
        if self.cfg.mup is None:
            return 1.0
        m = self.m_ffn if name.endswith("mlp.c_proj.weight") else self.m_d
        return m * self.cfg.density if self.cfg.mup.sparse_correction else m

    def init_std(self, name: str) -> float:
        """Truncated-normal std of a weight matrix by its role (seeds-spec 1.3, 3.2, 3.3, 4)."""
        cfg = self.cfg
        sigma_base = cfg.mup.sigma_base if cfg.mup else cfg.init_std or cfg.SP_INIT_STD
        if not self.is_hidden(name):
            return sigma_base  # the token and position embeddings
        std = sigma_base * self.width_multiplier(name) ** -0.5
        if name.endswith("c_proj.weight"):  # residual-output projections: also by depth
            std *= (2 * self.cfg.n_layers) ** -0.5
        return std

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            with fp32_copy(p) as w:  # the same numbers under every ZeRO stage (fp32_copy)
                if name.endswith("bias"):
                    nn.init.zeros_(w)
                elif ".ln_" in name or name.startswith("ln_f"):
                    nn.init.ones_(w)
                else:
                    truncated_normal_(w, self.init_std(name))
        if self.cfg.density < 1:
            self.sparsify()

    @torch.no_grad()
    def sparsify(self) -> None:
        """Sparse muP's static random masks: each hidden matrix keeps round(density * size)
        weights, chosen at initialisation (from torch's seeded generator) and fixed for the run.
        Masked weights start at zero and their gradients are zeroed by a hook, so AdamW never
        moves them (zero gradient, zero moments, decay of zero), under any ZeRO stage that keeps
        whole parameters."""
        for name, p in self.named_parameters():
            if not self.is_hidden(name):
                continue
            buffer = name.replace(".", "_") + "_dropped"
            with fp32_copy(p) as w:
                keep = round(self.cfg.density * w.numel())
                dropped = torch.ones(w.numel(), dtype=torch.bool)
                dropped[torch.randperm(w.numel())[:keep]] = False
                self.register_buffer(buffer, dropped.view_as(w), persistent=False)
                w.masked_fill_(getattr(self, buffer), 0)
            # Looked up at each call, so it follows the module to its device; a boolean mask
            # serves gradients of any dtype (bf16 under DeepSpeed, whose buffers stay as built).
            p.register_hook(lambda grad, buffer=buffer: grad.masked_fill(getattr(self, buffer), 0))

    def lr_scale(self, name: str) -> float:
        """muP's Adam learning-rate multiplier: 1/m_d for hidden matrices (1/m_ffn for the FFN
        down projection), divided further by the density under sparse muP; 1 for the rest."""
        return 1.0 / self.width_multiplier(name) if self.is_hidden(name) else 1.0

    def group_of(self, name: str) -> str:
        """The parameter's AdamW group: "embedding" (token and position embeddings), "hidden"
        (attention and FFN-in matrices), "ffn_down" (the FFN down projection, muP's m_ffn) or
        "no_decay" (biases and LayerNorms)."""
        if name.endswith("bias") or ".ln_" in name or name.startswith("ln_f"):
            return "no_decay"
        if not self.is_hidden(name):
            return "embedding"
        return "ffn_down" if name.endswith("mlp.c_proj.weight") else "hidden"

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """AdamW groups with each group's own base rate and a `name`; a schedule must scale, not
        overwrite, the rates (metrics.jsonl logs them as the optimizer holds them).

        Weight decay skips biases and LayerNorms, as Cerebras does. PyTorch's AdamW multiplies the
        decay by the group's rate, so hidden matrices decay 1/m_d as fast (Cerebras' coupling is
        not documented; seeds-spec 1.3 marks it unconfirmed)."""
        groups: dict[str, dict] = {}
        for name, p in self.named_parameters():
            group = self.group_of(name)
            if group not in groups:
                decay = 0.0 if group == "no_decay" else weight_decay
                rate = lr * self.lr_scale(name)
                groups[group] = {"name": group, "params": [], "lr": rate, "weight_decay": decay}
            groups[group]["params"].append(p)
        return list(groups.values())


def truncated_normal_(w: torch.Tensor, std: float) -> None:
    """Fill `w` (contiguous, on the CPU) in place with Normal(0, std) truncated to +-2 std, as
    Cerebras initialise: draw every value, then draw again only those outside the range (4.6% at
    first, 22x fewer each round). torch.nn.init.trunc_normal_ redraws the whole tensor each round
    in torch 2.13 (9.2 s per 10^8 values on 2 cores, against 1.2 s here: BTLM-3B's initialisation
    took minutes), and its algorithm differs between releases (inverse CDF before): the same seed
    gave other weights. These draws depend only on torch's normal_. A meta tensor stays as it is."""
    if w.is_meta:  # a model built on the meta device, to be loaded: nothing to draw
        return
    flat = w.view(-1)
    flat.normal_(0.0, std)
    outside = flat < -2 * std  # two masks of a byte a value, no fp32 temporary (memory.py)
    outside |= flat > 2 * std
    outside = outside.nonzero()[:, 0]
    while len(outside):
        # new_empty: inside deepspeed.zero.Init torch.empty would make the draws bf16
        draws = flat.new_empty(len(outside)).normal_(0.0, std)
        flat[outside] = draws
        outside = outside[draws.abs() > 2 * std]


@contextlib.contextmanager
def fp32_copy(p: nn.Parameter) -> Iterator[torch.Tensor]:
    """The whole parameter as an fp32 tensor on the CPU, written back into it on exit: what
    `reset_parameters` and `sparsify` draw into, so that every ZeRO stage starts from the same
    numbers. A model built inside `deepspeed.zero.Init` (ZeRO-3, `lmpipe.train.build`) holds each
    parameter partitioned across ranks, in bf16, on the GPU: here it is gathered (every rank draws
    the same numbers from the same seed; rank 0's are kept), and the draws come from the CPU's
    generator in fp32, as for a model built whole, then are rounded once."""
    if p.is_meta:  # a model built on the meta device, to be loaded: nothing to draw into
        yield p.detach()
        return
    gathered = contextlib.nullcontext()
    if hasattr(p, "ds_id"):  # a ZeRO-3 parameter
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters([p], modifier_rank=0)
    with gathered, torch.no_grad():
        w = p.detach().to("cpu", torch.float32, copy=True)
        yield w
        p.copy_(w)


def block_parameters(cfg: ModelConfig) -> int:
    """One block's parameters: two LayerNorms, attention (qkv and output) and the MLP."""
    d, f = cfg.d_model, cfg.d_ff
    mlp = (2 if cfg.mlp == "swiglu" else 1) * (d * f + f) + (f * d + d)
    return 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + mlp


def count_parameters(cfg: ModelConfig, embeddings: bool = True) -> int:
    """Closed-form parameter count (the tied unembedding counted once), for dry runs.
    `embeddings=False`: without the token and position embeddings (Kaplan et al.'s N)."""
    d = cfg.d_model
    positions = cfg.n_positions * d if cfg.position == "learned" else 0
    embedding = cfg.vocab_size * d + positions if embeddings else 0
    return embedding + cfg.n_layers * block_parameters(cfg) + 2 * d
