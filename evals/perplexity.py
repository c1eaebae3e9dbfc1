"""Perplexity on held-out token shards, and long-context loss by position (seeds-spec 2).

`heldout_perplexity` scores every held-out document (its tokens as `lmpipe tokenize` wrote them,
without the trailing end-of-text) with the harness's rolling disjoint windows of max_length
tokens (the model's training sequence length), the first window prefixed by end-of-text, and
reports, over the sum of all log-likelihoods, as lm-eval's `wikitext` does:

    token_perplexity = exp(-LL / tokens)
    word_perplexity  = exp(-LL / words)       words = len(re.split(r"\\s+", text)) per document
    byte_perplexity  = exp(-LL / bytes)       bytes = UTF-8 bytes of the decoded document
    bits_per_byte    = -LL / bytes / ln 2

`loss_by_position` measures how loss changes along a window of L tokens, L possibly past the
training length: windows are consecutive stretches of the held-out token stream (documents
joined by end-of-text, as training reads them), loss is averaged per position over windows and
then over position buckets, with plain ALiBi and with ALiBi position interpolation
(alibi_scale = L / train_seq_len when L > train_seq_len, the dynamic mode of seeds-spec 2).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmpipe.dataprep.figures import LITERAL, draw_picture, literal_legend
from lmpipe.dataprep.shards import TokenShards
from lmpipe.evals.lm import GPTLM, Progress

# Documents scored per pass: memory stays flat however large the held-out split is (BTLM's 0.17%
# of SlimPajama is about a billion tokens).
CHUNK_DOCUMENTS = 256


def heldout_perplexity(lm: GPTLM, shards: TokenShards, limit: int | None = None) -> dict[str, Any]:
    """Perplexities of the first `limit` non-empty held-out documents (all by default)."""
    lls: list[float] = []
    n_tokens: list[int] = []
    words = n_bytes = 0
    chunk: list[list[int]] = []

    def score(chunk: list[list[int]]) -> None:
        nonlocal words, n_bytes
        lls.extend(lm.loglikelihood_rolling_tokens(chunk))
        n_tokens.extend(len(d) for d in chunk)
        for doc in chunk:
            text = lm.encoding.decode(doc)
            words += count_words(text)
            n_bytes += len(text.encode("utf-8"))

    for doc in shards.documents():
        if limit is not None and len(n_tokens) + len(chunk) >= limit:
            break
        if len(doc):  # an empty document has nothing to predict (and would count one "word")
            chunk.append(doc.tolist())
        if len(chunk) == CHUNK_DOCUMENTS:
            score(chunk)
            chunk = []
    if chunk:
        score(chunk)
    return perplexity_metrics(lls, n_tokens, words, n_bytes)


def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))  # as lm-eval's wikitext counts words


def perplexity_metrics(
    lls: Sequence[float], n_tokens: Sequence[int], words: int, n_bytes: int
) -> dict[str, Any]:
    """Token, word and byte perplexity and bits per byte from per-document log-likelihoods and
    the documents' total words and UTF-8 bytes."""
    ll = float(sum(lls))
    tokens = int(sum(n_tokens))

    def value(x: float) -> dict[str, float | None]:
        return {"value": x, "stderr": None}  # the harness reports no stderr for these either

    nan = float("nan")
    return {
        "token_perplexity": value(math.exp(-ll / tokens) if tokens else nan),
        "word_perplexity": value(math.exp(-ll / words) if words else nan),
        "byte_perplexity": value(math.exp(-ll / n_bytes) if n_bytes else nan),
        "bits_per_byte": value(-ll / n_bytes / math.log(2) if n_bytes else nan),
        "n": len(lls),
        "n_tokens": tokens,
        "n_words": words,
        "n_bytes": n_bytes,
    }


@torch.no_grad()
def position_losses(
    model: torch.nn.Module,
    shards: TokenShards,
    length: int,
    *,
    alibi_scale: float = 1.0,
    n_windows: int | None = None,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> np.ndarray:
    """Mean next-token loss (nats) at each of `length` positions, over consecutive windows of the
    held-out stream (position p predicts token p + 1 of its window from the p + 1 before it)."""
    available = (shards.n_tokens - 1) // length
    n = available if n_windows is None else min(n_windows, available)
    if n < 1:
        raise ValueError(
            f"the held-out split has {shards.n_tokens} tokens, fewer than one window of {length + 1}"
        )
    total_T = torch.zeros(length, dtype=torch.float64)
    for start in range(0, n, batch_size):
        rows = range(start, min(start + batch_size, n))
        block = np.stack([shards.tokens(r * length, r * length + length + 1) for r in rows]).astype(
            np.int64
        )
        block_BT = torch.from_numpy(block).to(device)
        logits_BTV, _ = model(block_BT[:, :-1], alibi_scale=alibi_scale)
        loss_BT = F.cross_entropy(logits_BTV.transpose(1, 2), block_BT[:, 1:], reduction="none")
        total_T += loss_BT.double().sum(0).cpu()
        if progress is not None:
            progress(rows.stop, n)
    return (total_T / n).numpy()


def bucket_means(losses_T: np.ndarray, n_buckets: int) -> list[dict[str, Any]]:
    """Equal-width position buckets [start, stop) with their mean loss."""
    edges = np.linspace(0, len(losses_T), n_buckets + 1).round().astype(int)
    return [
        {"start": int(a), "stop": int(b), "loss": float(losses_T[a:b].mean())}
        for a, b in zip(edges[:-1], edges[1:], strict=True)
        if b > a
    ]


def loss_by_position(
    model: torch.nn.Module,
    shards: TokenShards,
    length: int,
    train_seq_len: int,
    *,
    n_windows: int | None = 8,
    n_buckets: int = 8,
    batch_size: int = 1,
    base_scale: float = 1.0,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Loss per position bucket over windows of `length`, without and (past the training length)
    with ALiBi position interpolation; the same windows for both. `base_scale`: the fixed
    interpolation the model was trained with (a long fine-tune's), under both."""
    runs = {"alibi": base_scale}
    if length > train_seq_len:
        runs["alibi_pi"] = base_scale * length / train_seq_len
    out: dict[str, Any] = {"length": length, "train_seq_len": train_seq_len, "curves": {}}
    for name, scale in runs.items():
        losses = position_losses(
            model,
            shards,
            length,
            alibi_scale=scale,
            n_windows=n_windows,
            batch_size=batch_size,
            device=device,
            progress=progress,
        )
        out["curves"][name] = {"alibi_scale": scale, "buckets": bucket_means(losses, n_buckets)}
        # The headline numbers: the whole window, and the stretch past the training length.
        out[f"loss_{name}"] = {"value": float(losses.mean()), "stderr": None}
        if length > train_seq_len:
            out[f"loss_beyond_train_{name}"] = {
                "value": float(losses[train_seq_len:].mean()),
                "stderr": None,
            }
    out["n"] = min(n_windows or (shards.n_tokens - 1) // length, (shards.n_tokens - 1) // length)
    return out


def write_long_context_png(path: Any, report: dict[str, Any]) -> bool:
    """Loss by position of every long-context task of an eval report: one colour per window
    length, plain ALiBi solid, interpolated dashed, the training length marked. False (and no
    file) when there is no such task, without matplotlib, or when drawing fails (one line on
    stderr says which of the last two)."""
    tasks = {n: r for n, r in report["tasks"].items() if isinstance(r, dict) and "curves" in r}
    if not tasks:
        return False
    return draw_picture(Path(path), lambda png: _draw_long_context_png(png, report, tasks))


def _draw_long_context_png(path: Path, report: dict[str, Any], tasks: dict[str, Any]) -> None:
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 4.2), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    cmap = colormaps["viridis"]
    ordered = sorted(tasks.items(), key=lambda item: item[1]["length"])
    for i, (name, result) in enumerate(ordered):
        color = cmap(i / max(len(ordered) - 1, 1))
        for curve, style in (("alibi", "-"), ("alibi_pi", "--")):
            if curve not in result["curves"]:
                continue
            data = result["curves"][curve]
            buckets = data["buckets"]
            xs = [(b["start"] + b["stop"]) / 2 for b in buckets]
            ys = [b["loss"] for b in buckets]
            label = f"{name} (L {result['length']:,}), s = {data['alibi_scale']:g}"
            ax.plot(xs, ys, style, color=color, marker=".", lw=1.2, label=label)
    train_seq_len = ordered[0][1]["train_seq_len"]
    ax.axvline(train_seq_len, color="grey", lw=0.8, ls=":")
    ax.annotate(
        f"training length {train_seq_len:,}",
        (train_seq_len, 1),
        xycoords=("data", "axes fraction"),
        fontsize=7,
        rotation=90,
        va="top",
        ha="right",
    )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the window (bucket centre)")
    ax.set_ylabel("held-out loss (nats)")
    ax.set_title(
        f"{report['recipe']}: long-context loss by position (dashed: ALiBi interpolation)",
        fontsize=9,
        **LITERAL,
    )
    ax.grid(alpha=0.3)
    literal_legend(ax, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
