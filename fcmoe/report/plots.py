"""Figures written into the run folder (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def partition_heatmap(counts: np.ndarray, label_names: Sequence[str], path: Path, title: str = "") -> Path:
    """Clients × labels heatmap of document counts (train + test), each cell annotated when the grid is small.

    Parameters
    ----------
    counts
        ``[clients, labels]`` document counts.
    label_names
        One name per column.
    path
        Where the PNG is written.
    """
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[1] != len(label_names):
        raise ValueError(f"counts must be [clients, {len(label_names)} labels], got shape {counts.shape}")
    clients, labels = counts.shape
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * labels + 2.5), max(3.0, 0.35 * clients + 1.5)))
    image = ax.imshow(counts, aspect="auto", cmap="viridis")
    ax.set_xticks(range(labels), [str(n) for n in label_names], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(clients), [f"client {i}" for i in range(clients)], fontsize=8)
    ax.set_xlabel("label")
    if clients * labels <= 400:  # beyond ~20 × 20 the numbers no longer fit in their cells
        threshold = counts.max() / 2 if counts.size else 0
        for i in range(clients):
            for j in range(labels):
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7,
                        color="black" if counts[i, j] > threshold else "white")
    fig.colorbar(image, ax=ax, label="documents")
    ax.set_title(title or "documents per client and label", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
