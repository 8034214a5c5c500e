"""The end-of-run comparison table."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from fcmoe.algorithms import ALGORITHMS
from fcmoe.runs import MethodSummary


def display_name(method: str) -> str:
    """A method label as tables and figures show it: the algorithm's display name and its variant
    (``"fcmoe/no-projection"`` → ``"FC-MoE w/o projection"``); an unregistered name as it is."""
    name, _, variant = method.partition("/")
    try:
        shown = ALGORITHMS.get(name).display_name or name
    except KeyError:
        return method
    if not variant:
        return shown
    return f"{shown} w/o {variant.removeprefix('no-')}" if variant.startswith("no-") else f"{shown}/{variant}"


def summary_table(summaries: Sequence[MethodSummary], title: str = "") -> Table:
    """Method | global acc | local acc mean ± std | rounds | wall time."""
    table = Table(title=title or None)
    for column in ("method", "global acc", "local acc (mean ± std)", "rounds", "wall time"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for s in summaries:
        table.add_row(display_name(s.method), f"{s.global_acc:.4f}",
                      f"{s.local_acc_mean:.4f} ± {s.local_acc_std:.4f}", str(s.rounds), f"{s.wall_s:.1f} s")
    return table


def print_summary(summaries: Sequence[MethodSummary], title: str = "", console: Console | None = None) -> None:
    """Print the summary table of the methods to the terminal."""
    (console or Console()).print(summary_table(summaries, title))
