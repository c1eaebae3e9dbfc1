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

Requests are batched longest first and padded on the right; with causal attention the padding is
never attended to, so results do not depend on the batch size (tests/evals/test_lm.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.train.model import GPT

Progress = Callable[[int, int], None]  # (requests done, requests in total)


class LM(Protocol):
    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]: ...

    def loglikelihood_rolling(self, texts: list[str]) -> list[float]: ...


def encode_pair(
    encode: Callable[[str], list[int]], context: str, continuation: str, prefix_id: int
) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) by the harness's rule (module docstring).

    Encoding the whole string and cutting it at the context's length, rather than encoding the two
    parts apart, keeps the BPE merges a real text would have across the boundary."""
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


class GPTLM:
    """lm-eval's `LM` over a `lmpipe.train.model.GPT` (or anything called as
    `model(idx_BT, alibi_scale=s) -> (logits_BTV, _)`) and a tiktoken encoding.

    `max_length` is the longest input the model reads (the training sequence length);
    `alibi_scale` > 1 applies ALiBi position interpolation to every forward pass; `progress`, if
    set, is called after each batch with (requests done, requests in total).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        encoding,  # tiktoken.Encoding
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
        # Hugging Face's GPT-2 tokenizer reads "<|endoftext|>" in text as the special token; match it.
        return self.encoding.encode(text, allowed_special="all")

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
        inputs: list[list[int]] = []
        for context, continuation in requests:
            if not continuation:
                raise ValueError("a request has an empty continuation (nothing to score)")
            if len(continuation) > self.max_length:
                # The harness would score garbage here (its slice runs past the input); refuse.
                raise LmpipeError(
                    f"a continuation of {len(continuation)} tokens is longer than the model's "
                    f"max_length ({self.max_length})"
                )
            inputs.append((list(context) + list(continuation))[-(self.max_length + 1) :][:-1])
        # Longest first, as the harness does: the first batch is the largest, so an out-of-memory
        # shows at once, and batches hold inputs of similar length (little padding).
        order = sorted(range(len(requests)), key=lambda i: (-len(inputs[i]), i))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            for i, result in zip(batch, self._score_batch(batch, inputs, requests), strict=True):
                results[i] = result
            if self.progress is not None:
                self.progress(min(start + self.batch_size, len(order)), len(order))
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _score_batch(
        self,
        batch: list[int],
        inputs: list[list[int]],
        requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    ) -> list[tuple[float, bool]]:
        T = max(len(inputs[i]) for i in batch)
        idx_BT = torch.zeros(len(batch), T, dtype=torch.long)  # right padding, never attended to
        for row, i in enumerate(batch):
            idx_BT[row, : len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)
        # Position t predicts token t + 1, so a continuation is read off the last n_cont input
        # positions; only those rows of logits are needed.
        spans = [
            (row, len(inputs[i]) - len(requests[i][1]), len(inputs[i]))
            for row, i in enumerate(batch)
        ]
        logits_NV = self._logits_at(idx_BT.to(self.device), spans)
        out, pos = [], 0
        for i in batch:
            continuation = list(requests[i][1])
            # One request at a time: never a second [N, V] tensor beside the logits.
            logprobs_CV = F.log_softmax(logits_NV[pos : pos + len(continuation)].float(), dim=-1)
            pos += len(continuation)
            target_C = torch.tensor(continuation, dtype=torch.long, device=logprobs_CV.device)
            greedy = bool((logprobs_CV.argmax(dim=-1) == target_C).all())
            ll = float(logprobs_CV.gather(1, target_C[:, None]).sum())
            out.append((ll, greedy))
        return out

    def _logits_at(self, idx_BT: torch.Tensor, spans: list[tuple[int, int, int]]) -> torch.Tensor:
        """Logits [N, V] of the positions [start, stop) of each (row, start, stop), concatenated."""
        if not isinstance(self.model, GPT):
            logits_BTV, _ = self.model(idx_BT, alibi_scale=self.alibi_scale)
            return torch.cat([logits_BTV[row, a:b] for row, a, b in spans])
        # The [B, T, V] logits of a whole batch cost far more than the network below them at
        # small widths (50,257 floats a position); unembed only the positions that are scored.
        x_BTD = self.model.hidden_states(idx_BT, self.alibi_scale)
        return self.model.unembed(torch.cat([x_BTD[row, a:b] for row, a, b in spans]))
