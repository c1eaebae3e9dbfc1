"""Window loader: coverage of adjacent regions, bijective order, exact resume, world sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmpipe.dataprep.loader import WindowLoader, WindowPermutation
from lmpipe.dataprep.shards import TokenShards, write_shard_folder

FAKE_SHA = "ab" * 32
EOT = 50256
N_TOKENS = 3000
DOC_LEN = 37  # 36 tokens + end-of-text; 3000 is not a multiple, so the last document is short


def position_docs(n: int, doc_len: int) -> list[np.ndarray]:
    """Documents whose stream is: token at position p is p, except end-of-text at document ends.

    So a window's stream position can be read off its tokens.
    """
    return [np.arange(s, min(s + doc_len, n) - 1) for s in range(0, n, doc_len)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> TokenShards:
    folder: Path = tmp_path_factory.mktemp("loader") / "tok"
    write_shard_folder(
        folder,
        {"train": position_docs(N_TOKENS, DOC_LEN)},
        tokenizer_name="gpt2",
        tokenizer_sha256=FAKE_SHA,
        vocab_size=50257,
        eot_id=EOT,
        shard_tokens=400,  # several shards, so windows cross shard files
    )
    shards = TokenShards(folder, tokenizer_sha256=FAKE_SHA)
    assert shards.n_tokens == N_TOKENS and len(shards.shards) > 5
    return shards


def expected_window(loader: WindowLoader, position: int, seq_len: int) -> np.ndarray:
    stream = loader.data.tokens(0, loader.data.n_tokens).astype(np.int64)
    return stream[loader.data_positions(position + np.arange(seq_len + 1))]


def all_rows(loader: WindowLoader, **kw) -> list[np.ndarray]:
    return list(loader.batches(**kw))


def input_positions(rows: list[np.ndarray]) -> list[int]:
    """Data positions of the input tokens of every window (a token's value is its position)."""
    return [int(t) for batch in rows for row in batch for t in row[:-1] if t != EOT]


def test_blocks_cover_the_data_once_per_epoch(data: TokenShards) -> None:
    loader = WindowLoader(data, seed=7)
    assert loader.block == N_TOKENS // 16 and loader.n_blocks == 16
    assert loader.epoch_tokens == 16 * loader.block > N_TOKENS - loader.block
    for epoch in (0, 1):
        stream = np.arange(epoch * loader.epoch_tokens, (epoch + 1) * loader.epoch_tokens)
        np.testing.assert_array_equal(
            np.sort(loader.data_positions(stream)), np.arange(loader.epoch_tokens)
        )
    first, second = (
        loader.data_positions(
            np.arange(
                e * loader.epoch_tokens, e * loader.epoch_tokens + 3 * loader.block, loader.block
            )
        )
        for e in (0, 1)
    )
    assert not np.array_equal(first, second)  # each epoch has its own block order


def test_two_stages_cover_adjacent_regions_without_overlap(data: TokenShards) -> None:
    loader = WindowLoader(data, seed=7)
    stage1 = dict(seq_len=16, global_batch=4, region_start=0, n_batches=20)
    region1 = 16 * 4 * 20
    stage2 = dict(seq_len=64, global_batch=2, region_start=region1, n_batches=10)
    region2 = region1 + 64 * 2 * 10
    got1 = input_positions(all_rows(loader, **stage1))
    got2 = input_positions(all_rows(loader, **stage2))
    stream = data.tokens(0, N_TOKENS)
    want1 = [int(d) for d in loader.data_positions(np.arange(0, region1)) if stream[d] != EOT]
    want2 = [int(d) for d in loader.data_positions(np.arange(region1, region2)) if stream[d] != EOT]
    assert sorted(got1) == sorted(want1)  # every input token of the region exactly once
    assert sorted(got2) == sorted(want2)
    assert not set(got1) & set(got2)  # disjoint: only the shifted target token is shared


def test_windows_are_the_stream_tokens_and_wrap_around(data: TokenShards) -> None:
    loader = WindowLoader(data, seed=3)
    seq_len, g, start = 50, 8, N_TOKENS - 120  # the region runs past the end of an epoch
    n_batches = 10
    perm = loader.permutation(seq_len=seq_len, region_start=start, n_windows=g * n_batches)
    order = perm(np.arange(g * n_batches))
    for b, batch in enumerate(
        loader.batches(seq_len=seq_len, global_batch=g, region_start=start, n_batches=n_batches)
    ):
        assert batch.dtype == np.int64 and batch.shape == (g, seq_len + 1)
        for row, k in zip(batch, order[b * g : (b + 1) * g], strict=True):
            np.testing.assert_array_equal(
                row, expected_window(loader, start + int(k) * seq_len, seq_len)
            )


def test_window_longer_than_the_data_repeats_it(data: TokenShards) -> None:
    loader = WindowLoader(data, seed=0)
    (batch,) = loader.batches(seq_len=2 * N_TOKENS, global_batch=1, region_start=5, n_batches=1)
    np.testing.assert_array_equal(batch[0], expected_window(loader, 5, 2 * N_TOKENS))


def test_each_stage_samples_the_whole_corpus_not_its_input_order(tmp_path: Path) -> None:
    """Two sources one after the other (75% / 25% of the tokens, as tokenize writes them); a
    75% / 25% two-stage run must not give the second stage only the second source."""
    n = 2_000_000
    folder = tmp_path / "two_sources"
    docs = [np.full(999, 1 if s < 0.75 * n else 2) for s in range(0, n, 1000)]
    write_shard_folder(
        folder,
        {"train": docs},
        tokenizer_name="gpt2",
        tokenizer_sha256=FAKE_SHA,
        vocab_size=50257,
        eot_id=EOT,
    )
    loader = WindowLoader(TokenShards(folder, tokenizer_sha256=FAKE_SHA), seed=0)
    boundary = int(0.75 * loader.epoch_tokens)
    stage1 = loader.data_positions(np.arange(0, boundary, 97))
    stage2 = loader.data_positions(np.arange(boundary, loader.epoch_tokens, 97))
    share1, share2 = ((p >= 0.75 * n).mean() for p in (stage1, stage2))
    assert 0.15 < share1 < 0.35 and 0.12 < share2 < 0.40, (share1, share2)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 1000, 4097, 65536])
def test_permutation_is_a_bijection(n: int) -> None:
    out = WindowPermutation(n, b"k")(np.arange(n))
    np.testing.assert_array_equal(np.sort(out), np.arange(n))
    if n >= 1000:
        assert (out != np.arange(n)).mean() > 0.99  # and really shuffles
        assert not np.array_equal(out, WindowPermutation(n, b"other")(np.arange(n)))


def test_permutation_of_a_huge_region_needs_no_table() -> None:
    n = 3 * 10**11  # more windows than BTLM's whole run: evaluated pointwise, O(1) memory
    perm = WindowPermutation(n, b"k")
    out = perm(np.arange(10**5, 2 * 10**5))
    assert out.min() >= 0 and out.max() < n and len(np.unique(out)) == len(out)
    np.testing.assert_array_equal(perm(np.arange(10**5 + 7, 10**5 + 9)), out[7:9])


def test_resume_equals_uninterrupted(data: TokenShards) -> None:
    kw = dict(seq_len=32, global_batch=6, region_start=100, n_batches=12)
    full = all_rows(WindowLoader(data, seed=1), **kw)
    resumed = all_rows(WindowLoader(data, seed=1), **kw, start_batch=5)
    assert len(resumed) == 7
    for a, b in zip(full[5:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    assert all_rows(WindowLoader(data, seed=1), **kw, start_batch=12) == []


def test_world_sizes_partition_the_same_global_batches(data: TokenShards) -> None:
    kw = dict(seq_len=24, global_batch=8, region_start=0, n_batches=6)
    one = all_rows(WindowLoader(data, seed=5), **kw)
    for world in (2, 4):
        ranks = [
            all_rows(WindowLoader(data, seed=5), **kw, rank=r, world_size=world)
            for r in range(world)
        ]
        for b, full in enumerate(one):
            assert all(ranks[r][b].shape == (8 // world, 25) for r in range(world))
            np.testing.assert_array_equal(np.concatenate([ranks[r][b] for r in range(world)]), full)
    with pytest.raises(ValueError, match="divisible"):
        next(WindowLoader(data, seed=5).batches(**kw, rank=0, world_size=3))


def test_seeds_change_the_order_and_an_epoch_reads_every_token_once(data: TokenShards) -> None:
    loader = WindowLoader(data, seed=1)
    seq_len = 16
    n_windows = loader.epoch_windows(seq_len)
    kw = dict(seq_len=seq_len, global_batch=n_windows // 11, region_start=0, n_batches=11)
    assert n_windows % 11 == 0
    a = all_rows(loader, **kw)
    np.testing.assert_array_equal(
        np.concatenate(a), np.concatenate(all_rows(WindowLoader(data, seed=1), **kw))
    )
    b = all_rows(WindowLoader(data, seed=2), **kw)
    assert not np.array_equal(np.concatenate(a), np.concatenate(b))
    stream = data.tokens(0, N_TOKENS)
    every = [d for d in range(loader.epoch_tokens) if stream[d] != EOT]
    for rows in (a, b):  # whatever the seed, one epoch's windows hold each data token once
        assert sorted(input_positions(rows)) == sorted(every)


def test_epoch_windows(data: TokenShards) -> None:
    loader = WindowLoader(data, seed=0)
    assert loader.epoch_windows(2048) == loader.epoch_tokens // 2048 == 1
    assert loader.epoch_windows(7) == loader.epoch_tokens // 7
    with pytest.raises(ValueError):
        loader.epoch_windows(0)
