"""Mixtures: each batch drawn from the sources in proportion, exactly resumable, the same global
batches for any world size, a small source upsampled epoch after epoch without disturbing the rest."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from lmpipe.dataprep.loader import WindowLoader
from lmpipe.dataprep.mixture import ONE, MixtureLoader, StageSource, counts, quotas, slot_sources
from lmpipe.dataprep.shards import TokenShards, write_shard_folder

FAKE_SHA = "ab" * 32
EOT = 50256


def source_folder(root: Path, source: int, n_tokens: int) -> TokenShards:
    """A token folder whose token at stream position p is source * 10,000 + p (documents of 50
    with end-of-text), so a window says where it came from."""
    base = source * 10_000
    docs = [np.arange(base + s, base + min(s + 50, n_tokens) - 1) for s in range(0, n_tokens, 50)]
    folder = root / f"s{source}"
    write_shard_folder(
        folder, {"train": docs}, tokenizer_name="gpt2", tokenizer_sha256=FAKE_SHA,
        vocab_size=50257, eot_id=EOT, shard_tokens=700,
    )  # fmt: skip
    return TokenShards(folder, tokenizer_sha256=FAKE_SHA)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, TokenShards]:
    root = tmp_path_factory.mktemp("mix")
    return {"web": source_folder(root, 0, 6000), "code": source_folder(root, 1, 3000), "books": source_folder(root, 2, 800)}  # fmt: skip


def origin(batch: np.ndarray) -> np.ndarray:
    """Each window's source, from its first token that is not end-of-text."""
    first = np.where(batch[:, 0] != EOT, batch[:, 0], batch[:, 1])
    return first // 10_000


def stage(weights: dict[str, float], seq_len: int, n_slots: int, drawn=None) -> tuple[StageSource, ...]:  # fmt: skip
    q = quotas(list(weights.values()))
    windows = counts(n_slots, q)
    drawn = drawn or {}
    return tuple(
        StageSource(name, quota, drawn.get(name, 0), n)
        for name, quota, n in zip(weights, q, windows, strict=True)
    )


def test_counts_add_up_and_each_sources_slots_are_numbered_in_order():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 7)
        weights = [rng.uniform(0.01, 1) for _ in range(n)]
        q = quotas(weights)
        total = rng.randint(1, 20_000)
        c = counts(total, q)
        assert sum(c) == total
        src, idx = slot_sources(np.arange(total), q)
        for s in range(n):
            assert (idx[src == s] == np.arange(c[s])).all()


def test_any_stretch_of_slots_holds_each_share_within_one_window_a_source():
    """The tolerance the mixture promises: in any S consecutive slots, source s fills w_s S
    windows give or take the number of sources (2^-40 quota rounding aside)."""
    rng = random.Random(1)
    for _ in range(20):
        n = rng.randint(2, 7)
        w = np.array([rng.uniform(0.02, 1) for _ in range(n)])
        w /= w.sum()
        q = quotas(list(w))
        start = rng.choice([0, 12_345, 10**11])  # late in a long run too
        S = rng.choice([64, 512, 4096])
        src, _ = slot_sources(np.arange(start, start + 20 * S), q)
        for a in range(0, 19 * S, S // 2):
            got = np.bincount(src[a : a + S], minlength=n)
            assert np.all(np.abs(got - w * S) <= n + 2**-40 * (start + 20 * S)), (got, w * S)


def test_one_source_is_the_single_folder_loader(sources):
    web = {"web": sources["web"]}
    mixture = MixtureLoader(web, seed=3)
    plain = WindowLoader(sources["web"], seed=3)
    kw = dict(seq_len=64, global_batch=16, n_batches=12)
    want = list(plain.batches(region_start=128, **kw))
    got = list(mixture.batches(sources=(StageSource("web", ONE, 128, 16 * 12),), **kw))
    assert all((a == b).all() for a, b in zip(want, got, strict=True))


def test_batches_are_mixed_in_proportion_and_deterministic(sources):
    weights = {"web": 0.5, "code": 0.3, "books": 0.2}
    plan = stage(weights, 32, 40 * 20)
    loader = MixtureLoader(sources, seed=5)
    kw = dict(seq_len=32, global_batch=40, sources=plan, n_batches=20)
    batches = list(loader.batches(**kw))
    for b in batches:  # every batch, not just the whole stage
        got = np.bincount(origin(b), minlength=3)
        assert np.all(np.abs(got - np.array([20, 12, 8])) <= 3), got
    assert all((a == b).all() for a, b in zip(batches, loader.batches(**kw), strict=True))
    other = list(MixtureLoader(sources, seed=6).batches(**kw))
    assert not all((a == b).all() for a, b in zip(batches, other, strict=True))


def test_every_world_size_sees_the_same_global_batches_and_a_resume_is_exact(sources):
    plan = stage({"web": 0.6, "code": 0.25, "books": 0.15}, 16, 48 * 10)
    loader = MixtureLoader(sources, seed=2)
    kw = dict(seq_len=16, global_batch=48, sources=plan, n_batches=10)
    whole = list(loader.batches(**kw))
    for world in (2, 4):
        ranks = [list(loader.batches(rank=r, world_size=world, **kw)) for r in range(world)]
        for b, batch in enumerate(whole):
            assert (np.concatenate([ranks[r][b] for r in range(world)]) == batch).all()
    resumed = list(loader.batches(start_batch=7, **kw))
    assert all((a == b).all() for a, b in zip(whole[7:], resumed, strict=True))


def test_a_small_source_is_upsampled_epoch_after_epoch_without_disturbing_the_others(sources):
    """books (800 tokens) drawn for ~3 epochs: its windows reshuffle each epoch and cover it;
    the web windows are the same whatever books holds."""
    weights = {"web": 0.4, "books": 0.6}
    plan = stage(weights, 20, 40 * 10)
    loader = MixtureLoader(sources, seed=9)
    batches = np.concatenate(list(loader.batches(seq_len=20, global_batch=40, sources=plan, n_batches=10)))  # fmt: skip
    books = batches[origin(batches) == 2]
    drawn = plan[1].windows * 20
    epoch = loader.epoch_windows("books", 20) * 20
    assert drawn / epoch > 2.5  # upsampled
    values = sources["books"].tokens(0, 800).astype(np.int64)
    values = values[values != EOT] - 20_000
    seen = np.bincount(books[:, :-1][books[:, :-1] != EOT] - 20_000, minlength=800)
    assert seen[values].min() >= 2  # every token of books read, epoch after epoch
    # web's windows do not depend on books: a mixture with a bigger books source keeps them
    bigger = dict(sources, books=sources["web"])  # a different, larger source under "books"
    other = np.concatenate(list(MixtureLoader(bigger, seed=9).batches(seq_len=20, global_batch=40, sources=plan, n_batches=10)))  # fmt: skip
    web = origin(batches) == 0
    assert (other[web] == batches[web]).all()


def test_a_later_stage_reads_each_source_after_what_earlier_stages_drew(sources):
    first = stage({"web": 0.5, "code": 0.5}, 16, 64)
    drawn = {s.name: s.windows * 16 for s in first}
    second = stage({"web": 0.2, "code": 0.8}, 32, 32, drawn)
    assert [s.region_start for s in second] == [drawn["web"], drawn["code"]]
    loader = MixtureLoader(sources, seed=4)
    a = np.concatenate(list(loader.batches(seq_len=16, global_batch=16, sources=first, n_batches=4)))  # fmt: skip
    b = np.concatenate(list(loader.batches(seq_len=32, global_batch=8, sources=second, n_batches=4)))  # fmt: skip
    for s in (0, 1):  # within an epoch, the two stages read disjoint tokens of each source
        ta = set(a[origin(a) == s][:, :-1].ravel().tolist()) - {EOT}
        tb = set(b[origin(b) == s][:, :-1].ravel().tolist()) - {EOT}
        assert len(ta & tb) <= 2  # only the shifted target token at a region's edge
