"""Lengths where characters, UTF-8 bytes and whitespace-split words disagree: held-out
perplexity's byte and word counts (lm-eval's wikitext: bytes = len(text.encode("utf-8")),
words = len(re.split(r"\\s+", text)), so whitespace at either end counts an empty word) and
acc_norm's choice length (lm-eval: len(choice), characters). Expected counts are by hand."""

from __future__ import annotations

import math

import pytest

from lmpipe.dataprep.shards import TokenShards
from lmpipe.evals.lm import GPTLM
from lmpipe.evals.perplexity import heldout_perplexity
from lmpipe.evals.tasks import choice_item, score_items

TEXTS = [
    # 22 characters; é, ï, é, é are 2 bytes each and the em dash 3: 22 + 4 + 2 = 28 bytes.
    # re.split(r"\s+"): "", "Café", "—", "naïve", "résumé.", "" = 6 words (str.split: 4)
    "\nCafé — naïve résumé.\n",
    # 22 characters; ë 2 bytes, ’ “ ” 3 bytes each: 22 + 1 + 6 = 29 bytes.
    # "", "Zoë’s", "“quoted”", "text", "" = 5 words (str.split: 3)
    "  Zoë’s “quoted” text\t",
]


def test_heldout_perplexity_counts_utf8_bytes_and_the_harness_words(
    tiny_gpt, gpt2, make_shards, tmp_path
):
    shards = TokenShards(make_shards(tmp_path / "tok", TEXTS), "heldout")
    result = heldout_perplexity(GPTLM(tiny_gpt, gpt2, max_length=32), shards)
    n_tokens = sum(len(gpt2.encode_ordinary(t)) for t in TEXTS)
    assert (result["n"], result["n_tokens"]) == (2, n_tokens)
    assert (result["n_bytes"], result["n_words"]) == (28 + 29, 6 + 5)
    # every metric divides the same log-likelihood by its own count
    nll = math.log(result["token_perplexity"]["value"]) * n_tokens
    assert math.log(result["word_perplexity"]["value"]) * 11 == pytest.approx(nll, rel=1e-6)
    assert result["bits_per_byte"]["value"] * 57 * math.log(2) == pytest.approx(nll, rel=1e-6)
    assert math.log(result["byte_perplexity"]["value"]) * 57 == pytest.approx(nll, rel=1e-6)


class TableLM:
    """Fixed log-likelihoods per (context, continuation), as a model would return them."""

    def __init__(self, table: dict[tuple[str, str], float]):
        self.table = table

    def loglikelihood(self, requests):
        return [(self.table[r], False) for r in requests]


def test_acc_norm_divides_by_characters_not_bytes():
    # Per character the ASCII choice wins (-2.0 / 2 > -1.5 / 1, -3.3 / 3 > -2.4 / 2); per UTF-8
    # byte the other would (-1.5 / 2 and -2.4 / 6 are the larger). acc takes the raw sums.
    items = [choice_item("Q:", ["é", "ab"], gold=1), choice_item("R:", ["日本", "abc"], gold=1)]
    lm = TableLM({("Q:", " é"): -1.5, ("Q:", " ab"): -2.0, ("R:", " 日本"): -2.4, ("R:", " abc"): -3.3})  # fmt: skip
    scores = score_items(lm, items)
    assert scores["acc"]["value"] == 0.0
    assert scores["acc_norm"]["value"] == 1.0
