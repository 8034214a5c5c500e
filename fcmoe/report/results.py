"""Results of finished runs, loaded from their folders and reduced to the report's tables.

A run folder (``fcmoe run`` or one cell of ``fcmoe sweep``) holds ``config.toml``, ``summary.json`` (final figures
per method) and ``metrics.jsonl`` (one row per method and round). Tables reduce over seeds: a cell is the mean over
the runs (seeds) at one α of a ``summary.json`` value, ± its standard deviation over seeds (n − 1 denominator; 0
for a single seed).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcmoe.errors import first_line
from fcmoe.metrics_row import GLOBAL_ACC, row_problem
from fcmoe.runs import RunFolderError, jsonl_lines


class ReportError(ValueError):
    """Nothing to report, or a run folder that cannot be read."""


log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """One run folder: its grid coordinates, final figures per method and per-round rows."""

    path: Path
    alpha: float
    seed: int
    summaries: dict[str, dict[str, Any]]  # method → summary.json fields
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl
    config: dict[str, Any] = field(default_factory=dict)  # config.toml as read
    unfinished: list[str] = field(default_factory=list)  # methods of its config without a summary (interrupted)
    initial: dict[str, float] = field(default_factory=dict)  # round 0: the initial model's scores (summary.json)

    def method_rows(self, method: str) -> list[dict[str, Any]]:
        return sorted((r for r in self.rows if r.get("method") == method), key=lambda r: r["round"])


@dataclass(frozen=True)
class Stat:
    """Mean ± std over ``n`` values (seeds)."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if not finite:
            return cls(math.nan, math.nan, 0)
        std = statistics.stdev(finite) if len(finite) > 1 else math.nan  # one seed has no spread, not a zero one
        return cls(statistics.fmean(finite), std, len(finite))

    def text(self) -> str:
        if self.n < 2:
            return "—" if self.n == 0 else f"{self.mean:.4f} (n = 1)"
        return f"{self.mean:.4f} ± {self.std:.4f}"


def find_runs(paths: Iterable[Path], drop_repeats: bool = True, problems: list[str] | None = None,
              ) -> list[RunResult]:
    """Every run folder at or under ``paths`` (a folder with ``summary.json``, or an interrupted one with
    ``config.toml`` and ``metrics.jsonl``), sorted by (α, seed, path); a method repeated at the same (α, seed)
    counts once unless ``drop_repeats`` is off (a study's regimes share both).

    A folder that cannot be read is left out with a warning, and a line naming it and why is appended to
    ``problems`` (when given; without it the folder stops the report).
    """
    folders: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise ReportError(f"{path} is not a folder; pass run folders or a sweep folder")
        folders += sorted({p.parent for pattern in ("summary.json", "metrics.jsonl") for p in path.rglob(pattern)
                           if (p.parent / "config.toml").is_file() or p.name == "summary.json"})
    runs = []
    for folder in dict.fromkeys(folders):
        try:
            runs.append(load_run(folder))
        except ReportError as err:
            if problems is None:
                raise
            log.warning("left out of the report: %s", err)
            problems.append(str(err))
    if not any(run.summaries for run in runs):
        unreadable = f"; left out: {problems[0]}" if problems else ""
        raise ReportError(f"no finished run (a folder with summary.json) under {', '.join(map(str, paths))}"
                          + unreadable)
    if drop_repeats:
        drop_repeated_methods(runs)
    return sorted(runs, key=lambda r: (r.alpha, r.seed, str(r.path)))


def drop_repeated_methods(runs: Sequence[RunResult]) -> None:
    """A method run at the same (α, seed) in two folders (a sweep extended into another folder) counts once: the
    folder passed later wins, and the repeat is logged, so no seed is averaged twice."""
    seen: dict[tuple[float, int, str], RunResult] = {}
    for run in runs:
        for method in list(run.summaries):
            earlier = seen.get((run.alpha, run.seed, method))
            if earlier is not None:
                log.warning("%s at α = %g, seed %d is in %s and %s: using the latter", method, run.alpha, run.seed,
                            earlier.path, run.path)
                del earlier.summaries[method]
                earlier.rows = [r for r in earlier.rows if r.get("method") != method]
            seen[(run.alpha, run.seed, method)] = run


def load_run(folder: Path) -> RunResult:
    """Read one run folder; a damaged file is a :class:`ReportError` naming it (and the line, in a JSON Lines)."""
    config_path, summary_path = folder / "config.toml", folder / "summary.json"
    try:
        config = tomllib.loads(config_path.read_text(encoding="utf-8"))
        alpha, seed = float(config["partition"]["alpha"]), int(config["seed"])
    except (OSError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise ReportError(f"cannot read {config_path}: {_reason(err)}") from None
    summaries: dict[str, Any] = {}
    initial: dict[str, float] = {}
    if summary_path.is_file():
        try:
            content = json.loads(summary_path.read_text(encoding="utf-8"))
            summaries, initial = content["methods"], content.get("initial", {})
            if not isinstance(summaries, dict) or not isinstance(initial, dict):
                raise TypeError("'methods' or 'initial' is not a table")
        except (OSError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
            raise ReportError(f"cannot read {summary_path}: {_reason(err)}") from None
    try:
        lines = jsonl_lines(folder / "metrics.jsonl")
    except RunFolderError as err:
        raise ReportError(str(err)) from None
    for number, (_, row) in enumerate(lines, 1):
        problem = row_problem(row)
        if problem is not None:  # a missing key would read as NaN in every table and figure
            raise ReportError(f"{folder / 'metrics.jsonl'} row {number}: {problem}")
    rows = [row for _, row in lines]
    finished = set(summaries)
    rows = [r for r in rows if r.get("method") in finished]  # rows of an interrupted method are not results
    unfinished = [m for m in config.get("methods", []) if m not in finished]
    return RunResult(folder, alpha, seed, summaries, rows, config, unfinished, initial)


def _reason(err: BaseException) -> str:
    if isinstance(err, KeyError):
        return f"it has no {err.args[0]!r}"
    return first_line(err)


def shifted_clients(run: RunResult) -> list[int]:
    """The clients of a run that saw permuted labels (``partition.concept_shift``, named in ``partition.json``)."""
    path = run.path / "partition.json"
    if not path.is_file():
        return []
    try:
        return sorted(int(c) for c in json.loads(path.read_text()).get("concept_shift", {}))
    except (OSError, ValueError, AttributeError) as err:
        raise ReportError(f"cannot read {path}: {err}") from None


def alphas_of(runs: Sequence[RunResult]) -> list[float]:
    """The Dirichlet α values of the runs, ascending."""
    return sorted({r.alpha for r in runs})


def methods_of(runs: Sequence[RunResult]) -> list[str]:
    """Every method in first-seen order (the order the runs listed them)."""
    return list(dict.fromkeys(m for r in runs for m in r.summaries))


def stat(runs: Sequence[RunResult], method: str, alpha: float, key: str) -> Stat:
    """Mean ± std over the runs at ``alpha`` of ``summary.json``'s ``methods[method][key]`` (or, for a summary
    written before that key existed, the method's last ``metrics.jsonl`` row's)."""
    values = []
    for run in runs:
        if run.alpha == alpha and method in run.summaries:
            last = (run.method_rows(method) or [{}])[-1]
            values.append(run.summaries[method].get(key, last.get(key, math.nan)))
    return Stat.of(values)


def curve(runs: Sequence[RunResult], method: str, alpha: float, key: str) -> tuple[list[int], list[Stat]]:
    """Per round, mean ± std over seeds of a ``metrics.jsonl`` value, from round 0 (the initial model, where
    ``summary.json`` has it); rounds no seed has a value for (not scored: ``eval.every``) are left out, so a curve
    joins the scored rounds."""
    by_round: dict[int, list[float]] = {}
    for run in runs:
        if run.alpha == alpha:
            if key in run.initial and method in run.summaries:  # round 0: the initial model, shared by every method
                by_round.setdefault(0, []).append(float(run.initial[key]))
            for row in run.method_rows(method):
                value = row.get(key)
                by_round.setdefault(int(row["round"]), []).append(math.nan if value is None else float(value))
    rounds = sorted(t for t, values in by_round.items() if any(math.isfinite(v) for v in values))
    return rounds, [Stat.of(by_round[t]) for t in rounds]


def layer_curve(runs: Sequence[RunResult], method: str, alpha: float, key: str,
                ) -> dict[str, tuple[list[int], list[Stat]]]:
    """Per MoE layer of a per-layer metric (e.g. ``conflict_rate_per_layer``), the curve over rounds."""
    per_layer: dict[str, dict[int, list[float]]] = {}
    for run in runs:
        if run.alpha == alpha:
            for row in run.method_rows(method):
                for layer, value in (row.get(key) or {}).items():
                    per_layer.setdefault(layer, {}).setdefault(int(row["round"]), []).append(float(value))
    return {layer: (sorted(rounds), [Stat.of(rounds[t]) for t in sorted(rounds)])
            for layer, rounds in per_layer.items()}


def rounds_to_target(runs: Sequence[RunResult], method: str, alpha: float, target: float) -> int | None:
    """First round whose seed-mean global accuracy reaches ``target``; None if it never does."""
    rounds, stats = curve(runs, method, alpha, GLOBAL_ACC)
    return next((t for t, s in zip(rounds, stats, strict=True) if s.n and s.mean >= target - 1e-12), None)


def default_target(runs: Sequence[RunResult], alpha: float, methods: Sequence[str]) -> float:
    """FedAvg's final seed-mean global accuracy at ``alpha`` (else the lowest final one among ``methods``)."""
    if "fedavg" in methods:
        return stat(runs, "fedavg", alpha, GLOBAL_ACC).mean
    finals = [stat(runs, m, alpha, GLOBAL_ACC).mean for m in methods]
    return min((f for f in finals if math.isfinite(f)), default=math.nan)
