"""clusters.png: the histogram of `lmpipe dedup`'s duplicate cluster sizes (optional matplotlib).

A cluster is a connected component of the duplicate pairs (exact and near): the kept document
and every document removed in its place, so every size is at least 2. The distribution itself,
size -> number of clusters, is in the manifest whether or not matplotlib is installed; this
module only draws it.
"""

from __future__ import annotations

from pathlib import Path

PNG = "clusters.png"
# Shown in the summary when matplotlib is missing: how to get the picture.
NO_PLOT = f"no {PNG}: matplotlib is not installed (pip install 'lmpipe[plot]')"


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_cluster_png(sizes: dict[str, int], path: Path) -> bool:
    """Draw `sizes` (cluster size -> clusters, as in the manifest) to `path`: the clusters per
    size on a log scale; the sizes binned logarithmically when they run past 50. False (and no
    file) when matplotlib is not importable. The PNG carries no version or date metadata, so the
    same distribution gives the same bytes with the same matplotlib."""
    if not have_matplotlib():
        return False
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

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
        else:
            edges = np.unique(np.geomspace(1.5, top + 0.5, 40))
            ax.set_xscale("log")
        ax.hist(
            size, bins=edges.tolist(), weights=count, log=True, color="#4c72b0", edgecolor="white"
        )
        ax.set_xlabel("documents in the cluster (kept + removed as duplicates)")
        ax.set_ylabel("clusters (log scale)")
        total = int(count.sum())
        ax.set_title(f"lmpipe dedup: {total:,} duplicate clusters, largest {top:,}")
    fig.tight_layout()
    # Software would name the matplotlib version: left out, as the manifest leaves out times.
    fig.savefig(path, format="png", metadata={"Software": None})
    return True
