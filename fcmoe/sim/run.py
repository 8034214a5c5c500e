"""One experiment: every method in turn (in-process engine, or Flower with ``engine = "flower"``), one run folder.

Run folder contents: ``config.toml`` (resolved), ``partition.json`` (client rows + label histograms),
``partition.png`` (clients × labels heatmap), ``metrics.jsonl`` (one line per method and round), ``summary.json``
(final figures per method).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fcmoe.config import ExperimentConfig
from fcmoe.experiment import Experiment, prepare_experiment
from fcmoe.report.plots import partition_heatmap
from fcmoe.sim.engine import MethodSummary, run_method

log = logging.getLogger(__name__)


def new_run_dir(out_dir: str | Path) -> Path:
    """A fresh, timestamped folder under ``out_dir``."""
    base = Path(out_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        run_dir = base / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run folder under {base}")


def run_experiment(config: ExperimentConfig, run_dir: Path, show_progress: bool = True) -> list[MethodSummary]:
    """Prepare the shared inputs once, run every configured method, write the run folder.

    The data, partition and model are prepared before anything is written, so a data error leaves ``run_dir``
    untouched.
    """
    exp = prepare_experiment(config)
    config.save(run_dir / "config.toml")
    save_partition(exp, run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    summaries: list[MethodSummary] = []
    total = len(config.methods) * config.rounds * exp.num_clients
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not show_progress, transient=True) as progress:
        task = progress.add_task("starting", total=total)

        def on_progress(method: str, round_index: int, clients_done: int) -> None:
            progress.update(task, advance=1, description=f"{method} round {round_index}/{config.rounds} "
                                                         f"client {clients_done}/{exp.num_clients}")

        for method in config.methods:
            if config.engine == "flower":
                from fcmoe.fl.server_app import run_flower_method  # the only path into flwr

                summary = run_flower_method(exp, method, run_dir)
            else:
                summary, _ = run_method(exp, method, metrics_path, on_progress)
            summaries.append(summary)
            (run_dir / "summary.json").write_text(json.dumps(
                {"setup_s": exp.setup_s, "methods": {s.method: dataclasses.asdict(s) for s in summaries}}, indent=2))
    return summaries


def save_partition(exp: Experiment, run_dir: Path) -> None:
    """``partition.json`` (rows and label histograms) and ``partition.png`` (clients × labels heatmap)."""
    exp.partition.save(run_dir / "partition.json", exp.pool.labels, exp.pool.label_names)
    hist = exp.partition.histograms(exp.pool.labels)
    counts = np.array(hist["train"]) + np.array(hist["test"])  # [clients, labels]
    part = exp.config.partition
    detail = f"α = {part.alpha}" if part.kind == "dirichlet" else part.kind
    partition_heatmap(counts, exp.pool.label_names, run_dir / "partition.png",
                      f"{exp.config.data.name}: {exp.num_clients} clients, {detail}, seed {exp.config.seed}")
