"""The report of ``fcmoe study``: when do FC-MoE's projection and retention change the result.

A study folder holds one cell folder per (regime, seed), ``<regime>-seed<s>`` (see :mod:`fcmoe.study`); every cell
runs FC-MoE and its ablations on the same data, partition and initial model. This module reads the cells' small
files only (``config.toml``, ``summary.json``, ``metrics.jsonl``, ``partition.json``) and writes ``study.md`` and
``study.png``:

- per regime, the paired difference FC-MoE − each other method for every seed (global and mean local accuracy),
  their mean ± std over seeds and how many seeds agree in sign;
- beside it, FC-MoE's mechanism metrics (conflict rate, projected share of importance weight, how far projection
  moved the step, retention next to the update), each the mean over rounds and MoE layers, then over seeds;
- a figure of projected weight share, projection step change and the accuracy gaps against local work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fcmoe.metrics_row import GLOBAL_ACC, LOCAL_ACC_MEAN
from fcmoe.plots import Points, errorbar_panels
from fcmoe.report.results import ReportError, RunResult, Stat, find_runs, shifted_clients

REFERENCE = "fcmoe"
ACCURACIES = ((GLOBAL_ACC, "global"), (LOCAL_ACC_MEAN, "local"))
# (metrics.jsonl key, heading, first round it can be nonzero: a residual exists only after round 1)
MECHANISMS = (("conflict_rate_per_layer", "conflict rate", 1),
              ("projected_weight_share_per_layer", "projected weight share", 1),
              ("projection_step_change_per_layer", "projection step change", 1),
              ("retention_ratio_per_layer", "retention ratio (rounds ≥ 2)", 2))


@dataclass
class Regime:
    """The cells of one study config, one per seed."""

    name: str
    local_steps: int
    concept_shift: float
    cells: list[RunResult]

    @property
    def label(self) -> str:
        shift = f", concept shift {self.concept_shift:g}" if self.concept_shift else ""
        return f"{self.name} ({self.local_steps} local steps{shift})"


def study_regimes(folder: Path) -> list[Regime]:
    """The regimes of a study folder, ordered by concept shift, then local work."""
    groups: dict[str, list[RunResult]] = {}
    for run in find_runs([folder], drop_repeats=False):
        name, sep, _ = run.path.name.rpartition("-seed")
        groups.setdefault(name if sep else run.path.name, []).append(run)
    regimes = []
    for name, cells in groups.items():
        train, partition = cells[0].config.get("train", {}), cells[0].config.get("partition", {})
        regimes.append(Regime(name, int(train.get("local_steps", 0)), float(partition.get("concept_shift", 0.0)),
                              sorted(cells, key=lambda c: c.seed)))
    return sorted(regimes, key=lambda r: (r.concept_shift, r.local_steps, r.name))


@dataclass(frozen=True)
class Paired:
    """FC-MoE − a method, seed by seed."""

    diffs: tuple[float, ...]

    @property
    def stat(self) -> Stat:
        return Stat.of(self.diffs)

    @property
    def signs(self) -> str:
        """How many seeds put FC-MoE ahead, behind and level, e.g. ``3+ 0− 0=``."""
        ahead = sum(d > 0 for d in self.diffs)
        behind = sum(d < 0 for d in self.diffs)
        return f"{ahead}+ {behind}− {len(self.diffs) - ahead - behind}="


def paired(regime: Regime, method: str, key: str) -> Paired:
    """``key`` of FC-MoE minus that of ``method`` in every cell that finished both."""
    return Paired(tuple(float(c.summaries[REFERENCE][key]) - float(c.summaries[method][key]) for c in regime.cells
                        if REFERENCE in c.summaries and method in c.summaries))


def mechanism(regime: Regime, method: str, key: str, first_round: int = 1) -> Stat:
    """Per cell, the mean of a per-layer metric over rounds ≥ ``first_round`` and MoE layers; then over seeds."""
    values = []
    for cell in regime.cells:
        points = [float(v) for row in cell.method_rows(method) if row["round"] >= first_round
                  for v in (row.get(key) or {}).values()]
        if points:
            values.append(sum(points) / len(points))
    return Stat.of(values)


def study_markdown(regimes: Sequence[Regime], figure: str) -> str:
    """The study's tables, one section per regime."""
    lines = ["# FC-MoE's projection and retention by regime (`fcmoe study`)", "",
             "Paired per seed: FC-MoE − method on the same data, partition and initial model; mean ± std over seeds "
             "(n − 1) and the signs (seeds with FC-MoE ahead + / behind − / level =). Mechanism metrics are FC-MoE's "
             "(and FC-MoE/pairwise's), each the mean over rounds and MoE layers, then mean ± std over seeds.", "",
             f"![projected weight and accuracy gap vs local work]({figure})", ""]
    for regime in regimes:
        methods = [m for m in dict.fromkeys(m for c in regime.cells for m in c.summaries) if m != REFERENCE]
        seeds = ", ".join(str(c.seed) for c in regime.cells)
        own = [c.summaries[REFERENCE] for c in regime.cells if REFERENCE in c.summaries]
        lines += [f"## {regime.label}", "", f"Seeds {seeds}. FC-MoE: global "
                  f"{Stat.of([s['global_acc'] for s in own]).text()}, local "
                  f"{Stat.of([s['local_acc_mean'] for s in own]).text()}.", ""]
        if regime.concept_shift:
            lines += ["Shifted clients: " + "; ".join(f"seed {c.seed}: {', '.join(map(str, shifted_clients(c)))}"
                                                     for c in regime.cells) + ".", ""]
        lines += ["| FC-MoE − | global (mean ± std) | signs | local (mean ± std) | signs | per seed (global / local) |",
                  "|---|---|---|---|---|---|"]
        for method in methods:
            g, loc = paired(regime, method, GLOBAL_ACC), paired(regime, method, LOCAL_ACC_MEAN)
            per_seed = ", ".join(f"{a:+.4f} / {b:+.4f}" for a, b in zip(g.diffs, loc.diffs, strict=True))
            lines.append(f"| {method} | {_signed(g.stat)} | {g.signs} | {_signed(loc.stat)} | {loc.signs} | "
                         f"{per_seed} |")
        lines += ["", "| mechanism | " + " | ".join(h for _, h, _ in MECHANISMS) + " |",
                  "|---|" + "---|" * len(MECHANISMS)]
        for method in (REFERENCE, *(m for m in methods if m.startswith(REFERENCE + "/"))):
            stats = [mechanism(regime, method, key, first) for key, _, first in MECHANISMS]
            if any(s.n for s in stats):
                lines.append(f"| {method} | " + " | ".join(s.text() for s in stats) + " |")
        lines.append("")
    return "\n".join(lines)


def _signed(stat: Stat) -> str:
    if stat.n == 0:
        return "—"
    return f"{stat.mean:+.4f}" + (f" ± {stat.std:.4f}" if stat.n > 1 else " (n = 1)")


def study_figure(regimes: Sequence[Regime], path: Path) -> Path:
    """Projected weight share and step change (left), FC-MoE − ablation (and − FedAvg) global accuracy (right), vs
    local steps; the concept-shift regimes are their own series, drawn a little to the right."""
    def series(pick: object) -> dict[str, Points]:
        out: dict[str, Points] = {}
        for shifted in (False, True):
            chosen = [r for r in regimes if bool(r.concept_shift) == shifted]
            for label, stat_of in pick(shifted):  # type: ignore[operator]
                nudge = 1.08 if shifted else 1.0  # so a shifted regime does not hide the unshifted one at the same x
                stats = [(r.local_steps * nudge, stat_of(r)) for r in chosen]
                stats = [(x, s) for x, s in stats if s.n]
                if stats:
                    out[label] = ([x for x, _ in stats], [s.mean for _, s in stats],
                                  [0.0 if math.isnan(s.std) else s.std for _, s in stats])
        return out

    def mechanisms(shifted: bool) -> list:
        tag = " (concept shift)" if shifted else ""
        return [(f"projected weight share{tag}", lambda r: mechanism(r, REFERENCE, MECHANISMS[1][0])),
                (f"projection step change{tag}", lambda r: mechanism(r, REFERENCE, MECHANISMS[2][0]))]

    def gaps(shifted: bool) -> list:
        tag = " (concept shift)" if shifted else ""
        return [(f"− {m.split('/')[-1]}{tag}", lambda r, m=m: paired(r, m, GLOBAL_ACC).stat)
                for m in ("fcmoe/no-projection", "fcmoe/no-retention", "fedavg")]

    return errorbar_panels([("FC-MoE's projection", "share / relative change", series(mechanisms)),
                            ("FC-MoE − ablation / FedAvg, global accuracy", "accuracy difference", series(gaps))],
                           path, "local optimizer steps per round (log)", "When do projection and retention act?")


def build_study_report(folder: Path, out: Path | None = None) -> Path:
    """``study.md`` and ``study.png`` of the study ``folder`` (into ``out``, default the folder itself)."""
    regimes = study_regimes(folder)
    if not any(REFERENCE in c.summaries for r in regimes for c in r.cells):
        raise ReportError(f"{folder}: no cell has finished FC-MoE yet; nothing to compare")
    out = out or folder
    out.mkdir(parents=True, exist_ok=True)
    study_figure(regimes, out / "study.png")
    path = out / "study.md"
    path.write_text(study_markdown(regimes, "study.png"))
    return path
