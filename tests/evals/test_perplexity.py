"""Held-out perplexity (token, word, byte) and loss by position, checked against hand sums."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmpipe.dataprep.shards import TokenShards
from lmpipe.evals.lm import GPTLM
from lmpipe.evals.perplexity import (
    bucket_means,
    heldout_perplexity,
    loss_by_position,
    position_losses,
)

EOT = 50256


@torch.no_grad()
def doc_loglikelihood(model, tokens: list[int], L: int) -> float:
    """Sum log p over a document by the disjoint-window rule, one forward per window."""
    stream = [EOT] + tokens
    total = 0.0
    for start in range(0, len(tokens), L):
        end = min(start + L, len(tokens))
        offset = max(0, end - L)
        logprobs = F.log_softmax(model(torch.tensor([stream[offset:end]]))[0][0], dim=-1)
        total += sum(float(logprobs[i - offset, tokens[i]]) for i in range(start, end))
    return total


def test_heldout_perplexity_by_hand(tiny_gpt, gpt2, make_shards, heldout_texts, tmp_path):
    texts = heldout_texts[:4] + [""]  # an empty document is skipped, not counted as a word
    shards = TokenShards(make_shards(tmp_path / "tok", texts), "heldout")
    L = 32
    result = heldout_perplexity(GPTLM(tiny_gpt, gpt2, max_length=L, batch_size=4), shards)
    docs = [gpt2.encode_ordinary(t) for t in texts[:4]]
    assert max(len(d) for d in docs) > 2 * L  # rolling windows are exercised
    ll = sum(doc_loglikelihood(tiny_gpt, d, L) for d in docs)
    n_tokens = sum(len(d) for d in docs)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts[:4])
    n_words = sum(len(re.split(r"\s+", t)) for t in texts[:4])
    assert result["n"] == 4 and result["n_tokens"] == n_tokens and result["n_bytes"] == n_bytes
    assert result["n_words"] == n_words
    assert result["token_perplexity"]["value"] == pytest.approx(math.exp(-ll / n_tokens), rel=1e-5)
    assert result["word_perplexity"]["value"] == pytest.approx(math.exp(-ll / n_words), rel=1e-5)
    assert result["bits_per_byte"]["value"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-5)
    assert result["byte_perplexity"]["value"] == pytest.approx(
        2 ** result["bits_per_byte"]["value"], rel=1e-9
    )
    limited = heldout_perplexity(GPTLM(tiny_gpt, gpt2, max_length=L), shards, limit=2)
    assert limited["n"] == 2 and limited["n_tokens"] == len(docs[0]) + len(docs[1])


@torch.no_grad()
def test_position_losses_by_hand(tiny_gpt, gpt2, make_shards, heldout_texts, tmp_path):
    shards = TokenShards(make_shards(tmp_path / "tok", heldout_texts), "heldout")
    L = 16
    got = position_losses(tiny_gpt, shards, L, n_windows=3, batch_size=2)
    stream = shards.tokens(0, 3 * L + 1).astype(np.int64)
    want = np.zeros(L)
    for w in range(3):
        window = torch.from_numpy(stream[w * L : w * L + L + 1])
        logits = tiny_gpt(window[None, :-1])[0][0]
        want += F.cross_entropy(logits, window[1:], reduction="none").numpy() / 3
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_loss_by_position_with_and_without_interpolation(
    tiny_gpt, gpt2, make_shards, heldout_texts, tmp_path
):
    shards = TokenShards(make_shards(tmp_path / "tok", heldout_texts), "heldout")
    result = loss_by_position(tiny_gpt, shards, 64, 32, n_windows=2, n_buckets=4)
    assert set(result["curves"]) == {"alibi", "alibi_pi"}
    assert result["curves"]["alibi_pi"]["alibi_scale"] == 2.0
    plain = [b["loss"] for b in result["curves"]["alibi"]["buckets"]]
    pi = [b["loss"] for b in result["curves"]["alibi_pi"]["buckets"]]
    assert [(b["start"], b["stop"]) for b in result["curves"]["alibi"]["buckets"]] == [
        (0, 16),
        (16, 32),
        (32, 48),
        (48, 64),
    ]
    assert plain != pytest.approx(pi)  # the slopes really were divided
    assert result["n"] == 2 and "loss_beyond_train_alibi_pi" in result
    within = loss_by_position(tiny_gpt, shards, 32, 32, n_windows=2)
    assert set(within["curves"]) == {"alibi"}  # no interpolation inside the training length
    with pytest.raises(ValueError, match="fewer than one window"):
        position_losses(tiny_gpt, shards, shards.n_tokens, n_windows=1)


def test_bucket_means():
    buckets = bucket_means(np.arange(10, dtype=float), 3)
    assert [(b["start"], b["stop"]) for b in buckets] == [(0, 3), (3, 7), (7, 10)]
    assert buckets[0]["loss"] == pytest.approx(1.0)
