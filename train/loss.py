"""The training loss without its [N, V] float32 logits (`loss_impl: chunked`).

For one 8,192-token sequence GPT-2's 50,257-column logits take 1.6 GB in float32, and the plain
loss keeps them, and their gradient, for the backward pass. `chunked_cross_entropy` forms them
`loss_chunk_tokens` rows at a time instead; the loss and every gradient equal the plain
`F.cross_entropy(F.linear(x, w).float(), target)` within rounding (tests/train/test_model_speed.py).

Shapes: N rows (batch x sequence), C rows of a chunk, D d_model, V vocabulary, P V padded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx

from lmpipe.train.data import IGNORE  # targets that count for nothing


def chunked_cross_entropy(
    x_ND: torch.Tensor,
    w_VD: torch.Tensor,
    target_N: torch.Tensor,
    chunk: int,
    compiled: bool = False,
) -> torch.Tensor:
    """`F.cross_entropy(F.linear(x_ND, w_VD).float(), target_N)`, the mean over the targets that
    are not IGNORE, without its [N, V] float32 logits: they are formed `chunk` rows at a time.
    With gradients to compute, `ChunkedCrossEntropy` forms each chunk's gradients at once too
    (`compiled`: its softmax work fused by torch.compile); without (evaluation), each chunk is
    only reduced to its loss."""
    if torch.is_grad_enabled() and (x_ND.requires_grad or w_VD.requires_grad):
        step = compiled_softmax_step() if compiled else softmax_step
        return ChunkedCrossEntropy.apply(x_ND, w_VD, target_N, chunk, step)
    total = torch.zeros((), device=x_ND.device)
    for s in range(0, len(x_ND), chunk):
        logits_CV = F.linear(x_ND[s : s + chunk], w_VD).float()
        total += F.cross_entropy(logits_CV, target_N[s : s + chunk], reduction="sum")
    return total / (target_N != IGNORE).sum()


def softmax_step(
    logits_CV: torch.Tensor,
    target_C: torch.Tensor,
    share_C: torch.Tensor,
    dtype: torch.dtype,
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's share of the loss, and d loss / d logits = (softmax - one_hot(target)) * share
    in `dtype`, each target's `share` being 1 / (targets counted), 0 for IGNORE. The softmax runs
    in float32 on the logits, as the plain loss's does; columns from `vocab_size` on are padding
    (`ChunkedCrossEntropy`): -inf, so they take no probability and get no gradient. Memory-bound
    work over [C, V]: in place where eager, one or two fused kernels where compiled."""
    logits_CV = logits_CV.float()
    logits_CV[:, vocab_size:] = float("-inf")
    lse_C = torch.logsumexp(logits_CV, dim=1)
    target_C1 = target_C.clamp(min=0)[:, None]  # IGNORE rows pick any logit: their share is 0
    loss = ((lse_C - logits_CV.gather(1, target_C1)[:, 0]) * share_C).sum()
    grad_CV = logits_CV.sub_(lse_C[:, None]).exp_()
    grad_CV.scatter_add_(1, target_C1, torch.full_like(lse_C[:, None], -1.0))
    return loss, grad_CV.mul_(share_C[:, None]).to(dtype)


# `softmax_step`'s signature, which its compiled form keeps.
SoftmaxStep = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype, int], tuple[torch.Tensor, torch.Tensor]
]


@functools.cache
def compiled_softmax_step() -> SoftmaxStep:
    """`softmax_step` through torch.compile: its memory-bound work fused, compiled once."""
    return torch.compile(softmax_step, dynamic=False)


VOCAB_ALIGN = 128  # GPT-2's 50,257 -> 50,304 (nanoGPT's padding, for the same reason)


class ChunkedCrossEntropy(torch.autograd.Function):
    """The loss and its gradients in one pass over chunks of rows, as Liger-Kernel's fused linear
    cross-entropy does: each chunk's logits are formed, reduced to the chunk's loss and turned
    into its gradients of x and of the weight, then freed. Only those gradients ([N, D] and
    [V, D]) wait for the backward pass, which scales them by the loss's incoming gradient
    (1 / gradient accumulation under DeepSpeed). No logits are recomputed (as a checkpointed loss
    would): the same FLOPs as the plain loss. A graph through it can be backpropagated once.

    The three matmuls run on a copy of the weight padded with zero rows to a multiple of
    VOCAB_ALIGN: an odd vocabulary (GPT-2's 50,257) makes every [C, V] operand's rows an odd
    number of elements long, which keeps GPU matmuls off their fastest, aligned kernels. The
    padded columns are -inf before the softmax (`softmax_step`): the loss and the gradients are
    the unpadded ones; the model and its checkpoints keep the vocabulary as it is."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x_ND: torch.Tensor,
        w_VD: torch.Tensor,
        target_N: torch.Tensor,
        chunk: int,
        step: SoftmaxStep = softmax_step,
    ) -> torch.Tensor:
        # The matmuls run in autocast's dtype when autocast is on, as F.linear would there.
        device = x_ND.device.type
        autocast = torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else x_ND.dtype
        V = len(w_VD)
        with torch.autocast(device, enabled=False):
            x_NDc = x_ND.to(dtype)
            w_PDc = F.pad(w_VD.to(dtype), (0, 0, 0, -V % VOCAB_ALIGN))  # P: V padded
            valid_N = target_N != IGNORE
            share_N = valid_N / valid_N.sum()  # each target's share of the mean
            loss = torch.zeros((), device=x_ND.device)
            grad_x_ND = torch.empty_like(x_ND)
            # Summed over chunks in float32, then rounded once, as one matmul over all rows would.
            grad_w_VD = torch.zeros_like(w_VD, dtype=torch.float32)
            for s in range(0, len(x_ND), chunk):
                x_CD, target_C, share_C = (t[s : s + chunk] for t in (x_NDc, target_N, share_N))
                chunk_loss, grad_CP = step(F.linear(x_CD, w_PDc), target_C, share_C, dtype, V)
                loss += chunk_loss
                grad_x_ND[s : s + chunk] = grad_CP @ w_PDc
                grad_w_VD += (grad_CP.t() @ x_CD)[:V]
        ctx.save_for_backward(grad_x_ND, grad_w_VD.to(w_VD.dtype))
        return loss

    # ctx is the FunctionCtx that forward filled, but torch's stubs type its `saved_tensors` as a
    # 1-tuple (tuple[Tensor]) and its own Functions take `ctx: Any`. One gradient per output of
    # forward: here the one loss.
    @staticmethod
    def backward(
        ctx: Any, grad_loss: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None, None, None]:
        grad_x_ND, grad_w_VD = ctx.saved_tensors
        return grad_x_ND * grad_loss, grad_w_VD * grad_loss, None, None, None
