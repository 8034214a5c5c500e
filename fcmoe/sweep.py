"""A grid of experiments, ``fcmoe sweep``: every (α, seed) cell is one run folder holding every method.

Layout of a sweep folder::

    sweep.toml                 the grid (alphas, seeds, methods) and the base config it was started with
    alpha0.1-seed0/            one run folder per cell (see :mod:`fcmoe.runs`): the methods of a cell share its
    alpha0.5-seed0/ …          data, partition and initial model, so they differ only by the algorithm

Cells run seed-major (every α of seed 0 first), so an interrupted sweep already has complete rows for the seeds it
finished. Running the same command again resumes: finished cells are skipped, a half-done cell runs only its
missing methods, and the ``metrics.jsonl`` rows of a method that was interrupted are dropped and rerun. Adding a
method or a seed to the command extends the sweep; changing anything else into the same folder is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fcmoe.config import ConfigError, ExperimentConfig, build_config
from fcmoe.data.partition import PartitionError
from fcmoe.runner import run_experiment
from fcmoe.runs import MethodSummary, check_same_experiment, load_summaries

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cell:
    """One grid point: its folder name and its experiment."""

    name: str
    config: ExperimentConfig


def sweep_cells(base: ExperimentConfig, alphas: Sequence[float], seeds: Sequence[int]) -> list[Cell]:
    """The grid, seed-major: ``alpha{α}-seed{s}`` with ``partition.alpha = α`` and ``seed = s``.

    An empty ``alphas`` keeps the base partition (any kind); a non-empty one needs a Dirichlet partition.
    """
    if not seeds:
        raise ConfigError("--seeds is empty: give at least one seed, e.g. --seeds 0,1,2")
    if alphas and base.partition.kind != "dirichlet":
        raise ConfigError(f"--alphas needs partition.kind = \"dirichlet\", the config has {base.partition.kind!r}; "
                          "drop --alphas or set partition.kind")
    for alpha in alphas:
        if not alpha > 0:
            raise ConfigError(f"--alphas: α = {alpha} must be > 0 (Dirichlet concentration, e.g. 0.1,0.5,1.0)")
    for values, flag in ((alphas, "--alphas"), (seeds, "--seeds")):
        if len(set(values)) != len(values):
            raise ConfigError(f"{flag} lists a value twice: {list(values)}")
    cells = []
    for seed in seeds:
        for alpha in alphas or [base.partition.alpha]:
            config = dataclasses.replace(base, seed=seed,
                                         partition=dataclasses.replace(base.partition, alpha=float(alpha)))
            cells.append(Cell(f"alpha{float(alpha):g}-seed{seed}", config))
    return cells


def run_sweep(base: ExperimentConfig, alphas: Sequence[float], seeds: Sequence[int], sweep_dir: Path,
              show_progress: bool = True, jobs: int = 1) -> list[Path]:
    """Run (or resume) every cell of the grid under ``sweep_dir``; return the cell folders in grid order.

    ``jobs > 1`` runs that many cells at once, each in its own process with ``threads // jobs`` threads: cells are
    separate folders, so nothing is written twice. Worth it where one process leaves the hardware idle — a GPU
    between small kernels (the default benchmark: 9 processes kept an H200 at 99 %), or more cores than one
    process uses well. On the CPU a cell's result can depend on its thread count in the last bits, so keep
    ``jobs`` fixed within a sweep you compare across.
    """
    if jobs < 1:
        raise ConfigError(f"--jobs = {jobs}: must be >= 1 (cells run at once)")
    cells = sweep_cells(base, alphas, seeds)
    check_cells(cells, sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "sweep.toml").write_text(tomli_w.dumps(
        {"alphas": [float(a) for a in alphas], "seeds": list(seeds), "methods": list(base.methods),
         "base": base.to_dict()}))
    return run_cells(cells, sweep_dir, show_progress, jobs)


def check_cells(cells: Sequence[Cell], folder: Path) -> None:
    """Refuse, before any work, a cell whose folder under ``folder`` already holds another experiment."""
    for cell in cells:
        if (folder / cell.name / "config.toml").is_file():
            check_same_experiment(cell.config, folder / cell.name)


SKIPPED = "skipped.json"  # in a cell folder: why the cell could not run (its partition could not be drawn)


def run_cells(cells: Sequence[Cell], folder: Path, show_progress: bool = True, jobs: int = 1) -> list[Path]:
    """Run (or resume) ``cells`` in their folders under ``folder``, in order (``jobs`` at once); return the folders.

    A finished method of a cell is skipped, so running the same cells again resumes where the last run stopped. A
    cell whose partition cannot be drawn (:class:`~fcmoe.data.partition.PartitionError`: too few documents for this
    α and seed) is skipped with a warning and its reason in ``<cell>/skipped.json``; the others run, and the report
    lists it as missing. Running the cells again tries it again.
    """
    if jobs < 1:
        raise ConfigError(f"--jobs = {jobs}: must be >= 1 (cells run at once)")
    todo = {cell.name: [m for m in cell.config.methods if m not in load_summaries(folder / cell.name)]
            for cell in cells}
    total_runs = sum(len(cell.config.methods) for cell in cells)
    runs_done = total_runs - sum(len(m) for m in todo.values())
    log.info("%s: %d cells, %d of %d runs already done", folder, len(cells), runs_done, total_runs)
    steps = sum(len(todo[c.name]) * c.config.rounds * c.config.partition.num_clients for c in cells)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), disable=not show_progress) as progress:
        task = progress.add_task("sweep", total=steps)
        if jobs > 1:
            _run_parallel([c for c in cells if todo[c.name]], folder, jobs, progress, task)
            return [folder / cell.name for cell in cells]
        for cell in cells:
            if not todo[cell.name]:
                continue
            cell_dir = folder / cell.name
            cell_dir.mkdir(exist_ok=True)
            started = time.perf_counter()
            runs_before = total_runs - sum(len(m) for m in todo.values())

            def advance(method: str, round_index: int, clients_done: int, cell: Cell = cell,
                        runs_before: int = runs_before) -> None:
                done = runs_before + todo[cell.name].index(method)
                progress.update(task, advance=1, description=f"runs {done}/{total_runs} · {cell.name} {method} "
                                                             f"round {round_index}/{cell.config.rounds}")

            summaries = _run_or_skip(cell.config, cell_dir, advance)
            todo[cell.name] = []
            if summaries:
                log.info("%s done in %.0f s: %s", cell.name, time.perf_counter() - started,
                         ", ".join(f"{s.method} {s.global_acc:.4f}" for s in summaries))
    return [folder / cell.name for cell in cells]


def _run_parallel(cells: Sequence[Cell], sweep_dir: Path, jobs: int, progress: Progress, task: TaskID) -> None:
    """The cells on ``jobs`` worker processes; client-rounds done come back through a queue for the progress bar."""
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold CUDA or OpenMP state
    events = context.Queue()
    threads = max(1, torch.get_num_threads() // jobs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_init_worker,
                             initargs=(threads, events)) as pool:
        try:
            # configs travel as plain dicts (they hold read-only mappings, which do not pickle)
            pending = {pool.submit(_run_cell, cell.config.to_dict(), sweep_dir / cell.name): cell for cell in cells}
            _wait_for_cells(pool, pending, events, progress, task, jobs, threads, len(cells))
        except KeyboardInterrupt:  # Ctrl-C reaches the workers too; a scheduler's stop may reach this process only
            pool.shutdown(wait=False, cancel_futures=True)  # no queued cell starts
            for worker in multiprocessing.active_children():
                worker.terminate()  # its round in hand is dropped; its last checkpoint stands
            raise
    while not events.empty():
        progress.update(task, advance=events.get())


def _wait_for_cells(pool: ProcessPoolExecutor, pending: dict[Any, Cell], events: Any, progress: Progress,
                    task: TaskID, jobs: int, threads: int, cells: int) -> None:
    """Until every cell of ``pending`` (future → cell) is done: log each as it finishes, advance the bar."""
    finished = 0
    while pending:
        done = [f for f in pending if f.done()]
        for future in done:
            cell = pending.pop(future)
            if future.exception() is not None:  # cells not started are dropped, running ones finish
                pool.shutdown(cancel_futures=True)
                raise future.exception()
            summaries = future.result()
            finished += 1
            if not summaries:
                continue
            log.info("%s done: %s", cell.name, ", ".join(f"{s.method} {s.global_acc:.4f}" for s in summaries))
        while not events.empty():
            progress.update(task, advance=events.get(),
                            description=f"cells {finished}/{cells} · {jobs} processes × {threads} threads")
        time.sleep(0.2)


_EVENTS: Any = None  # the worker's end of the progress queue


def _init_worker(threads: int, events: Any) -> None:
    global _EVENTS
    torch.set_num_threads(threads)
    _EVENTS = events


def _run_cell(config: dict[str, Any], cell_dir: Path) -> list[MethodSummary]:
    cell_dir.mkdir(exist_ok=True)
    return _run_or_skip(build_config(config), cell_dir, lambda *_: _EVENTS.put(1))


def _run_or_skip(config: ExperimentConfig, cell_dir: Path, on_progress: Any) -> list[MethodSummary]:
    """The cell's summaries; ``[]`` and ``skipped.json`` when its partition cannot be drawn."""
    (cell_dir / SKIPPED).unlink(missing_ok=True)
    try:
        return run_experiment(config, cell_dir, show_progress=False, on_progress=on_progress)
    except PartitionError as err:
        log.warning("%s skipped: %s", cell_dir.name, err)
        (cell_dir / SKIPPED).write_text(json.dumps({"reason": str(err)}))
        return []


def skipped_cells(folder: Path) -> dict[str, str]:
    """Cell name → why it was skipped, for every skipped cell under ``folder``."""
    found = {}
    for path in sorted(folder.glob(f"*/{SKIPPED}")):
        try:
            found[path.parent.name] = json.loads(path.read_text())["reason"]
        except (OSError, ValueError, KeyError, TypeError):
            found[path.parent.name] = f"unreadable {path}"
    return found
