"""Figures written into the run folder (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

HEATMAP_CLIENTS = 60  # rows a partition heatmap draws: beyond that the figure is taller than any screen


def partition_heatmap(counts: np.ndarray, label_names: Sequence[str], path: Path, title: str = "") -> Path:
    """Clients × labels heatmap of document counts (train + test), each cell annotated when the grid is small; of
    more than :data:`HEATMAP_CLIENTS` clients the first that many, said in the title (``partition.json`` has all).

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
    shown = ""
    if counts.shape[0] > HEATMAP_CLIENTS:
        shown = f" (clients 0–{HEATMAP_CLIENTS - 1} of {counts.shape[0]})"
        counts = counts[:HEATMAP_CLIENTS]
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
    ax.set_title((title or "documents per client and label") + shown, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


Curve = tuple[Sequence[int], Sequence[float], Sequence[float]]  # rounds, mean, std (over seeds)
MARKERS, LINE_STYLES = "osD^v<>Xp*", ("-", "--", ":", "-.")  # a line stays visible when others lie on it


def curve_grid(panels: Sequence[Sequence[tuple[str, dict[str, Curve]]]], row_labels: Sequence[str], path: Path,
               title: str = "", ylims: Sequence[tuple[float, float] | None] = (),
               chance: Sequence[float | None] = ()) -> Path:
    """A grid of line plots, each line its mean over seeds with a ±std band.

    Parameters
    ----------
    panels
        ``panels[r][c] = (panel title, {line label: (rounds, mean, std)})``; every row has the same length.
    row_labels
        The y-axis label of each row (e.g. "global accuracy").
    ylims
        Per row, fixed y limits (accuracy: (0, 1), so a one-document difference looks like one; ``None`` in a pair
        leaves that end free), or ``None``.
    chance
        Per row, a chance level drawn as a dashed grey line (accuracy: 1 / classes), or ``None``.
    """
    rows, cols = len(panels), max(len(row) for row in panels)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for r, row in enumerate(panels):
        for c, (panel_title, lines) in enumerate(row):
            ax = axes[r][c]
            for i, (label, (rounds, mean, std)) in enumerate(lines.items()):
                mean_a, std_a = np.asarray(mean, dtype=float), np.asarray(std, dtype=float)
                (line,) = ax.plot(rounds, mean_a, marker=MARKERS[i % len(MARKERS)], markersize=4, label=label,
                                  linestyle=LINE_STYLES[i % len(LINE_STYLES)], markerfacecolor="none")
                ax.fill_between(rounds, mean_a - std_a, mean_a + std_a, color=line.get_color(), alpha=0.15)
            level = chance[r] if r < len(chance) else None
            if level is not None:
                ax.axhline(level, color="grey", linestyle="--", linewidth=0.9, label=f"chance ({level:.3g})")
            if r < len(ylims) and ylims[r] is not None:
                low, high = ylims[r]
                ax.set_ylim(low, high)
                if high is None:  # room above the highest line, which would otherwise sit on the frame
                    ax.set_ylim(top=ax.get_ylim()[1] * 1.1)
            ax.ticklabel_format(axis="y", useOffset=False)  # an offset makes a 1e-5 difference look like a jump
            ax.set_title(panel_title, fontsize=10)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("round")
            ax.set_ylabel(row_labels[r])
            ax.grid(alpha=0.3)
            if lines:
                ax.legend(fontsize=7)
    return _save(fig, path, title)


def utilisation_heatmaps(shares: dict[str, np.ndarray], path: Path, title: str = "") -> Path:
    """Clients × experts heatmaps of routing shares, one panel per MoE layer.

    Parameters
    ----------
    shares
        MoE layer → ``[clients, E]``: each client's share of its tokens routed to each expert (rows sum to 1).
    """
    if not shares:
        raise ValueError("no MoE layer to plot: the runs recorded no per-client routing")
    fig, axes = plt.subplots(1, len(shares), figsize=(3.2 + 2.6 * len(shares), 3.6), squeeze=False)
    for ax, (layer, grid) in zip(axes[0], shares.items(), strict=True):
        grid = np.asarray(grid, dtype=float)
        image = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0.0, vmax=max(float(grid.max()), 1e-9))
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("client")
        ax.set_xticks(range(grid.shape[1]))
        ax.set_yticks(range(grid.shape[0]))
        ax.tick_params(labelsize=7)
        fig.colorbar(image, ax=ax, label="share of tokens")
    return _save(fig, path, title)


def _save(fig: plt.Figure, path: Path, title: str) -> Path:
    """Title, tight layout, PNG at 110 dpi, figure closed (pyplot keeps every open figure alive)."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


Points = tuple[Sequence[float], Sequence[float], Sequence[float]]  # x, mean, std (over seeds)


def errorbar_panels(panels: Sequence[tuple[str, str, dict[str, Points]]], path: Path, xlabel: str,
                    title: str = "", log_x: bool = True) -> Path:
    """One row of panels of points with ±std error bars, each series its own marker and line style.

    Parameters
    ----------
    panels
        ``(panel title, y-axis label, {series label: (x, mean, std)})`` per panel.
    """
    markers, styles = MARKERS, LINE_STYLES
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.8), squeeze=False)
    for ax, (panel_title, ylabel, series) in zip(axes[0], panels, strict=True):
        for i, (label, (x, mean, std)) in enumerate(series.items()):
            ax.errorbar(np.asarray(x, dtype=float), np.asarray(mean, dtype=float), yerr=np.asarray(std, dtype=float),
                        marker=markers[i % len(markers)], linestyle=styles[i % len(styles)], capsize=3, label=label)
        if log_x:
            ax.set_xscale("log")
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=7)
    return _save(fig, path, title)
