"""The seam between a model and the tasks: lm-evaluation-harness's `LM` interface, over our GPT.

An `LM` answers two kinds of request, and tasks see nothing else of the model:

    loglikelihood([(context, continuation), ...]) -> [(sum log p(continuation | context), greedy)]
    loglikelihood_rolling([text, ...])            -> [sum log p(text)]

`GPTLM` reproduces the harness's Hugging Face model (`HFLM`) rules exactly, so that a score here is
the score the harness would give the same weights:

  - token boundary (`_encode_pair`): trailing whitespace of the context moves to the front of the
    continuation; continuation tokens = encode(context + continuation)[len(encode(context)):];
    an empty context becomes [end-of-text] (unless the continuation's own first token is
    end-of-text: then that token is the context);
  - left truncation: the model reads (context + continuation)[-(max_length + 1):][:-1], and the
    log-probs of the last len(continuation) positions are summed; `greedy` is whether every
    continuation token is the argmax at its position;
  - rolling: disjoint windows of max_length tokens, the first prefixed by end-of-text, each later
    one conditioned on the max_length tokens before its last prediction (`get_rolling_token_windows`
    + `make_disjoint_window`, context_len 1).

How it is computed, which the scores do not depend on (tests/evals/test_lm.py):

  - identical requests are scored once;
  - requests with the same (untruncated) context tokens, the choices of a multiple-choice item,
    share one row of a batch: the context once, then each continuation as a branch that sees the
    context and itself only, at the positions it would have alone (`Row`). The harness runs the
    context once per choice; ARC's four choices of a 25-token question cost a third as much here;
  - rows are batched longest first and padded on the right; padding is never attended to;
  - only the scored positions are unembedded, a few thousand at a time, and reduced to
    (log-prob of the target, whether it is the argmax) without a second [N, V] tensor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, cast

import torch
import torch.nn.functional as F

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.train.model import GPT, Block

if TYPE_CHECKING:  # for annotations only: the encoding comes from `get_encoding`
    import tiktoken

Progress = Callable[[int, int], None]  # (requests done, requests in total)

# Positions unembedded at once: 4,096 x 50,257 float32 logits are 0.8 GB.
UNEMBED_CHUNK = 4096
# A batch of branched rows carries an explicit [B, H, T, T] attention bias; rows are taken
# until it would pass this many elements (1 GiB of float32), so long shared contexts batch fewer.
MASK_ELEMENTS = 1 << 28


class LM(Protocol):
    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]: ...

    def loglikelihood_rolling(self, texts: list[str]) -> list[float]: ...


def harness_encode(encoding: tiktoken.Encoding, text: str) -> list[int]:
    """GPT-2 tokens of a task's text. Hugging Face's GPT-2 tokenizer reads "<|endoftext|>" in
    text as the special token; so does this."""
    return encoding.encode(text, allowed_special="all")


def request_lengths(
    encoding: tiktoken.Encoding, context: str, continuation: str
) -> tuple[int, int]:
    """(context tokens, continuation tokens) of a request as `GPTLM.loglikelihood` scores it."""
    encode = functools.partial(harness_encode, encoding)
    context_enc, continuation_enc = encode_pair(encode, context, continuation, encoding.eot_token)
    return len(context_enc), len(continuation_enc)


def encode_pair(
    encode: Callable[[str], list[int]], context: str, continuation: str, prefix_id: int
) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) by the harness's rule (module docstring).

    Encoding the whole string and cutting it at the context's length, rather than encoding the two
    parts apart, keeps the BPE merges a real text would have across the boundary. A context of
    only whitespace moves whole into the continuation and leaves no context token, as in the
    harness, which then refuses the request (`GPTLM.loglikelihood_tokens` does too)."""
    if context == "":
        continuation_enc = encode(continuation)
        # TemplateLM.loglikelihood: a continuation that itself starts with the prefix token
        # (text beginning "<|endoftext|>") is conditioned on that token rather than on a second one.
        if continuation_enc and continuation_enc[0] == prefix_id:
            return continuation_enc[:1], continuation_enc[1:]
        return [prefix_id], continuation_enc
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        # " Paris" is one GPT-2 token; "Answer: " + "Paris" would score a rare lone-space token.
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(context + continuation)
    context_enc = encode(context)
    return context_enc, whole[len(context_enc) :]


def rolling_windows(
    tokens: Sequence[int], prefix_id: int, max_length: int
) -> Iterator[tuple[list[int], list[int]]]:
    """(context, continuation) token windows that score every token of `tokens` exactly once.

    The harness's `get_rolling_token_windows(..., context_len=1)` followed by
    `make_disjoint_window`: the first window predicts tokens[:max_length] from end-of-text; each
    later window predicts the next max_length tokens (fewer in the last), reading the max_length
    tokens that precede its last prediction, so the last window has more context than it scores.
    """
    tokens = list(tokens)
    if not tokens:
        return
    first = min(max_length, len(tokens))
    yield [prefix_id], tokens[:first]
    predicted = first
    while predicted < len(tokens):
        n_pred = min(len(tokens) - predicted, max_length)
        end = predicted + n_pred
        window = tokens[end - max_length - 1 : end - 1]
        yield window[: len(window) - (n_pred - 1)], tokens[end - n_pred : end]
        predicted += n_pred


# --- rows: what one sequence of a batch holds ------------------------------------------------


@dataclass
class Row:
    """One sequence of a batch: a prefix, then zero or more branches. A branch continues the
    prefix and attends to it and to itself only; `positions` are what each token's position would
    be in its own request's input, so every request sees exactly the input it has alone.

    `scored` lists, per request in `requests`, the row indices whose next-token predictions give
    its continuation, and `targets` those continuation tokens."""

    tokens: list[int]
    positions: list[int]
    branch: list[int]  # 0: the prefix; k >= 1: the k-th branch
    requests: list[int] = field(default_factory=list)
    scored: list[list[int]] = field(default_factory=list)
    targets: list[list[int]] = field(default_factory=list)

    @property
    def branched(self) -> bool:
        return any(self.branch)


def plain_row(request: int, context: Sequence[int], continuation: Sequence[int], max_length: int) -> Row:  # fmt: skip
    """A request alone: its left-truncated input, the last len(continuation) positions scored."""
    inputs = (list(context) + list(continuation))[-(max_length + 1) :][:-1]
    n, T = len(continuation), len(inputs)
    return Row(inputs, list(range(T)), [0] * T, [request], [list(range(T - n, T))], [list(continuation)])  # fmt: skip


def shared_row(context: Sequence[int], members: Sequence[tuple[int, Sequence[int]]]) -> Row:
    """Requests with one context: the context once, each continuation but its last token as a
    branch. A continuation's first token is predicted at the context's last position (shared);
    a one-token continuation adds nothing to the row."""
    m = len(context)
    row = Row(list(context), list(range(m)), [0] * m)
    for k, (request, continuation) in enumerate(members, 1):
        start, n = len(row.tokens), len(continuation)
        row.tokens += continuation[:-1]
        row.positions += range(m, m + n - 1)
        row.branch += [k] * (n - 1)
        row.requests.append(request)
        row.scored.append([m - 1, *range(start, start + n - 1)])
        row.targets.append(list(continuation))
    return row


def plan_rows(
    requests: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int, share: bool
) -> list[Row]:
    """Rows for distinct requests. With `share`, requests whose whole input fits and whose context
    (of two tokens or more) another request shares go into shared rows, as many branches to a
    row as fit in max_length tokens, so a row is never longer than a plain input (and the
    attention mask stays bounded); every other request is a row alone. A one-token context, the
    end-of-text before every text's first rolling window, would save nothing: each such window
    stays a row of its own."""
    rows: list[Row] = []
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (context, continuation) in enumerate(requests):
        fits = len(context) + len(continuation) <= max_length + 1  # no left truncation
        if share and fits and len(context) > 1:
            by_context.setdefault(tuple(context), []).append(i)
        else:
            rows.append(plain_row(i, context, continuation, max_length))
    for context, members in by_context.items():
        packs: list[list[int]] = []
        length = 0
        for i in members:
            branch = len(requests[i][1]) - 1
            if not packs or length + branch > max_length:
                packs.append([])
                length = len(context)
            packs[-1].append(i)
            length += branch
        for pack in packs:
            if len(pack) == 1:
                rows.append(plain_row(pack[0], context, requests[pack[0]][1], max_length))
            else:
                rows.append(shared_row(context, [(i, requests[i][1]) for i in pack]))
    return rows


def branched_hidden_states(
    model: GPT,
    idx_BT: torch.Tensor,
    pos_BT: torch.Tensor,
    branch_BT: torch.Tensor,
    alibi_scale: float,
) -> torch.Tensor:
    """`GPT.hidden_states` over branched rows: the same modules, each token at its own position,
    and attention through an explicit mask (query i sees key j when j's position is not later
    and j is in the prefix or in i's branch) instead of the plain causal one.
    Padding is branch -1 at position 0: it sees the first token, and no real token sees it.
    tests/evals/test_lm.py checks this equals `GPT.hidden_states` of each request alone."""
    see_BTS = (pos_BT[:, None, :] <= pos_BT[:, :, None]) & (
        (branch_BT[:, None, :] == 0) | (branch_BT[:, None, :] == branch_BT[:, :, None])
    )
    x_BTD = model.wte(idx_BT)
    if model.wpe is None:  # ALiBi: the bias GPT adds, over the same position distances
        slopes_H = model.slopes / alibi_scale
        distance_BTS = (pos_BT[:, :, None] - pos_BT[:, None, :]).to(torch.float32)
        bias = -slopes_H[None, :, None, None] * distance_BTS[:, None]
        mask = bias.masked_fill(~see_BTS[:, None], float("-inf")).to(x_BTD.dtype)
    else:
        x_BTD = x_BTD + model.wpe(pos_BT)
        mask = see_BTS[:, None]
    x_BTD = x_BTD * model.alpha_in
    B, T, D = x_BTD.shape
    for block in cast(list[Block], model.h):  # nn.ModuleList is not generic
        attn = block.attn
        q_BHTd, k_BHTd, v_BHTd = attn.heads(block.ln_1(x_BTD))
        y_BHTd = F.scaled_dot_product_attention(
            q_BHTd, k_BHTd, v_BHTd, attn_mask=mask, scale=attn.scale
        )
        x_BTD = x_BTD + attn.c_proj(y_BHTd.transpose(1, 2).reshape(B, T, D))
        x_BTD = x_BTD + block.mlp(block.ln_2(x_BTD))
    return model.ln_f(x_BTD) * (model.alpha_out / model.m_d)


class GPTLM:
    """lm-eval's `LM` over a `lmpipe.train.model.GPT` (or anything called as
    `model(idx_BT, alibi_scale=s) -> (logits_BTV, _)`: then every request is a row of its own,
    read off the full logits) and a tiktoken encoding.

    `max_length` is the longest input the model reads (the training sequence length);
    `batch_size` the rows per forward pass; `alibi_scale` > 1 applies ALiBi position
    interpolation to every forward pass; `progress`, if set, is called after each batch with
    (requests done, requests in total).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        encoding: tiktoken.Encoding,
        max_length: int,
        batch_size: int = 8,
        alibi_scale: float = 1.0,
        device: str | torch.device = "cpu",
        progress: Progress | None = None,
    ) -> None:
        if max_length < 1 or batch_size < 1:
            raise ValueError(
                f"max_length ({max_length}) and batch_size ({batch_size}) must be >= 1"
            )
        self.model, self.encoding = model, encoding
        self.max_length, self.batch_size = max_length, batch_size
        self.alibi_scale, self.device = alibi_scale, torch.device(device)
        self.progress = progress
        # The harness's prefix token for GPT-2 is its BOS, which is end-of-text (50256).
        self.prefix_id: int = encoding.eot_token

    def tok_encode(self, text: str) -> list[int]:
        return harness_encode(self.encoding, text)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return encode_pair(self.tok_encode, context, continuation, self.prefix_id)

    # --- the LM interface ----------------------------------------------------------------

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests])

    def loglikelihood_rolling(self, texts: list[str]) -> list[float]:
        return self.loglikelihood_rolling_tokens([self.tok_encode(t) for t in texts])

    # --- token level -----------------------------------------------------------------------

    def loglikelihood_rolling_tokens(self, token_lists: Sequence[Sequence[int]]) -> list[float]:
        """Sum of log p(token) over each token list (already encoded, e.g. held-out shards).

        Windows of all texts go into one batched pass; each text's windows are summed after."""
        owners: list[int] = []
        windows: list[tuple[list[int], list[int]]] = []
        for i, tokens in enumerate(token_lists):
            for window in rolling_windows(tokens, self.prefix_id, self.max_length):
                owners.append(i)
                windows.append(window)
        totals = [0.0] * len(token_lists)
        for owner, (ll, _) in zip(owners, self.loglikelihood_tokens(windows), strict=True):
            totals[owner] += ll
        return totals

    def loglikelihood_tokens(
        self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list[tuple[float, bool]]:
        """(sum log p, greedy) of each continuation given its context, both as token lists."""
        for context, continuation in requests:
            if not continuation:
                raise ValueError("a request has an empty continuation (nothing to score)")
            if not context:
                # Its first token would be predicted at position -1: another row's padding.
                raise ValueError("a request has no context token to predict its continuation from")
            if len(continuation) > self.max_length:
                # The harness would score garbage here (its slice runs past the input); refuse.
                raise LmpipeError(
                    f"a continuation of {len(continuation)} tokens is longer than the model's "
                    f"max_length ({self.max_length})"
                )
        # Identical requests (a repeated answer, a repeated window) are scored once.
        index: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
        unique: list[tuple[Sequence[int], Sequence[int]]] = []
        copies: list[int] = []
        of_request = []
        for context, continuation in requests:
            key = (tuple(context), tuple(continuation))
            if key not in index:
                index[key] = len(unique)
                unique.append((context, continuation))
                copies.append(0)
            copies[index[key]] += 1
            of_request.append(index[key])
        rows = plan_rows(unique, self.max_length, share=isinstance(self.model, GPT))
        # Longest first, as the harness does: the first batch is the largest, so an out-of-memory
        # shows at once, and batches hold rows of similar length (little padding).
        rows.sort(key=lambda r: -len(r.tokens))
        scores: list[tuple[float, bool]] = [(0.0, False)] * len(unique)
        done = 0
        for batch in self._batches(rows):
            for i, score in self._score_rows(batch):
                scores[i] = score
                done += copies[i]
            if self.progress is not None:
                self.progress(done, len(requests))
        return [scores[u] for u in of_request]

    def _batches(self, rows: list[Row]) -> Iterator[list[Row]]:
        """Up to `batch_size` rows each; fewer where branched rows' attention bias grows large."""
        heads = self.model.cfg.n_heads if isinstance(self.model, GPT) else 1
        start = 0
        while start < len(rows):
            longest = len(rows[start].tokens)  # rows are sorted longest first
            stop = start + 1
            while stop < len(rows) and stop - start < self.batch_size:
                branched = any(r.branched for r in rows[start : stop + 1])
                if branched and (stop + 1 - start) * heads * longest**2 > MASK_ELEMENTS:
                    break
                stop += 1
            yield rows[start:stop]
            start = stop

    @torch.inference_mode()
    def _score_rows(self, rows: list[Row]) -> list[tuple[int, tuple[float, bool]]]:
        """(request, (sum log p, greedy)) for every request of the rows, in one forward pass."""
        T = max(len(r.tokens) for r in rows)
        # Right padding (never attended to); padding is branch -1 (`branched_hidden_states`).
        idx_BT = torch.zeros(len(rows), T, dtype=torch.long)
        pos_BT = torch.zeros(len(rows), T, dtype=torch.long)
        branch_BT = torch.full((len(rows), T), -1, dtype=torch.long)
        for b, r in enumerate(rows):
            idx_BT[b, : len(r.tokens)] = torch.tensor(r.tokens)
            pos_BT[b, : len(r.tokens)] = torch.tensor(r.positions)
            branch_BT[b, : len(r.tokens)] = torch.tensor(r.branch)
        idx_BT = idx_BT.to(self.device)
        # Position t predicts token t + 1: each request reads its scored positions' predictions.
        where = [(b, t) for b, r in enumerate(rows) for scored in r.scored for t in scored]
        rows_N = torch.tensor([b for b, _ in where], device=self.device)
        cols_N = torch.tensor([t for _, t in where], device=self.device)
        target_N = torch.tensor(
            [t for r in rows for targets in r.targets for t in targets], device=self.device
        )
        owner_N = torch.tensor(
            [k for k, n in enumerate(len(s) for r in rows for s in r.scored) for _ in range(n)],
            device=self.device,
        )
        if not isinstance(self.model, GPT):
            logits_BTV, _ = self.model(idx_BT, alibi_scale=self.alibi_scale)
            ll_N, hit_N = target_logprobs(logits_BTV[rows_N, cols_N].float(), target_N)
        else:
            if any(r.branched for r in rows):
                x_BTD = branched_hidden_states(
                    self.model,
                    idx_BT,
                    pos_BT.to(self.device),
                    branch_BT.to(self.device),
                    self.alibi_scale,
                )
            else:
                x_BTD = self.model.hidden_states(idx_BT, self.alibi_scale)
            x_ND = x_BTD[rows_N, cols_N]
            # The [N, V] logits cost far more than the network below them at small widths
            # (50,257 floats a position): unembed only the scored positions, a chunk at a time.
            chunks = range(0, len(x_ND), UNEMBED_CHUNK)
            parts = [
                target_logprobs(
                    self.model.unembed(x_ND[s : s + UNEMBED_CHUNK]), target_N[s : s + UNEMBED_CHUNK]
                )
                for s in chunks
            ]
            ll_N = torch.cat([ll for ll, _ in parts])
            hit_N = torch.cat([hit for _, hit in parts])
        n_requests = sum(len(r.requests) for r in rows)
        # Summed in float64: index_add_ adds one by one, and a 2,048-token window's float32 sum
        # would drift past the harness's own (pairwise) float32 sum.
        ll_R = torch.zeros(n_requests, dtype=torch.float64, device=ll_N.device)
        misses_R = torch.zeros(n_requests, dtype=torch.long, device=ll_N.device)
        ll_R.index_add_(0, owner_N, ll_N.double())
        misses_R.index_add_(0, owner_N, (~hit_N).long())
        requests = [i for r in rows for i in r.requests]
        return [
            (i, (ll, misses == 0))
            for i, ll, misses in zip(requests, ll_R.tolist(), misses_R.tolist(), strict=True)
        ]


def target_logprobs(logits_NV: torch.Tensor, target_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """log p(target) at each position, log_softmax's value without its [N, V] output, and whether
    the target is the argmax (the first maximum, as the harness's `argmax` picks)."""
    logits_NV = logits_NV.float()
    target_logit_N = logits_NV.gather(1, target_N[:, None])[:, 0]
    return target_logit_N - torch.logsumexp(logits_NV, dim=-1), logits_NV.argmax(dim=-1) == target_N
