"""The end-of-run comparison table."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from fcmoe.sim.engine import MethodSummary

DISPLAY_NAMES = {"fedavg": "FedAvg", "fedmoe": "FedMoE", "pflmoe": "PFL-MoE", "fcmoe": "FC-MoE"}


def summary_table(summaries: Sequence[MethodSummary], title: str = "") -> Table:
    """method | global acc | local acc mean ± std | rounds | wall time."""
    table = Table(title=title or None)
    for column in ("method", "global acc", "local acc (mean ± std)", "rounds", "wall time"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for s in summaries:
        table.add_row(DISPLAY_NAMES.get(s.method, s.method), f"{s.global_acc:.4f}",
                      f"{s.local_acc_mean:.4f} ± {s.local_acc_std:.4f}", str(s.rounds), f"{s.wall_s:.1f} s")
    return table


def print_summary(summaries: Sequence[MethodSummary], title: str = "", console: Console | None = None) -> None:
    (console or Console()).print(summary_table(summaries, title))
