"""clusters.png: the histogram of `lmpipe dedup`'s duplicate cluster sizes (optional matplotlib).

A cluster is a connected component of the duplicate pairs (exact and near): the kept document
and every document removed in its place, so every size is at least 2. The distribution itself,
size -> number of clusters, is in the manifest whether or not matplotlib is installed (or the
picture can be drawn); this module only draws it.
"""

from __future__ import annotations

from pathlib import Path

from lmpipe.dataprep.figures import draw_picture, have_matplotlib, no_matplotlib

PNG = "clusters.png"
# Shown in the summary when matplotlib is missing: how to get the picture.
NO_PLOT = no_matplotlib(Path(PNG))


def write_cluster_png(sizes: dict[str, int], path: Path) -> bool:
    """Draw `sizes` (cluster size -> clusters, as in the manifest) to `path`: the clusters per
    size on a log scale; the sizes binned logarithmically when they run past 50. False (and no
    file) without matplotlib (the caller says so in its summary) or when drawing fails (one line
    on stderr says so). The PNG carries no version or date metadata, so the same distribution
    gives the same bytes with the same matplotlib."""
    if not have_matplotlib():
        return False
    return draw_picture(path, lambda png: _draw(sizes, png))


def _draw(sizes: dict[str, int], path: Path) -> None:
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.ticker import MaxNLocator

    size = np.array([int(k) for k in sizes], dtype=np.int64)
    count = np.array(list(sizes.values()), dtype=np.int64)
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    ax = fig.add_subplot()
    if len(size) == 0:
        ax.text(0.5, 0.5, "no duplicate clusters", ha="center", va="center")
        ax.set_axis_off()
    else:
        top = int(size.max())
        if top <= 50:  # one bar per size: small clusters are the common case, read them exactly
            edges = np.arange(2, top + 2) - 0.5
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole documents
        else:
            edges = np.unique(np.geomspace(1.5, top + 0.5, 40))
            ax.set_xscale("log")
        ax.hist(
            size, bins=edges.tolist(), weights=count, log=True, color="#4c72b0", edgecolor="white"
        )
        ax.set_xlabel("documents in the cluster (kept + removed as duplicates)")
        ax.set_ylabel("clusters (log scale)")
        total = int(count.sum())
        clusters = "cluster" if total == 1 else "clusters"
        ax.set_title(f"lmpipe dedup: {total:,} duplicate {clusters}, largest {top:,}")
    fig.tight_layout()
    # Software would name the matplotlib version: left out, as the manifest leaves out times.
    fig.savefig(path, format="png", metadata={"Software": None})
