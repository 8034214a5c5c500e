"""One experiment: every method in turn (in-process engine, or Flower with ``engine = "flower"``), one run folder.

The folder's files are :mod:`fcmoe.runs`'; ``summary.json`` is rewritten after each method, so a rerun into the
same folder resumes after the last finished method (and, in-process, from the last checkpointed round).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fcmoe.checkpoint import checkpointed_round
from fcmoe.config import ExperimentConfig
from fcmoe.experiment import prepare_experiment
from fcmoe.plan import check_fits
from fcmoe.rounds import initial_scores
from fcmoe.runs import (
    MethodSummary,
    check_same_experiment,
    keep_rows,
    load_summaries,
    save_final_model,
    save_partition,
    save_summaries,
)
from fcmoe.sim.engine import RoundCallback, run_method
from fcmoe.tracking import make_tracker

log = logging.getLogger(__name__)


def run_experiment(config: ExperimentConfig, run_dir: Path, show_progress: bool = True,
                   on_progress: RoundCallback | None = None) -> list[MethodSummary]:
    """Prepare the shared inputs once, run every configured method, write the run folder.

    The data, partition and model are prepared before anything is written, so a data error leaves ``run_dir``
    untouched. A folder that already holds this experiment is resumed: methods listed in its ``summary.json`` are
    kept, the ``metrics.jsonl`` rows of a method that was interrupted are dropped, and only the missing methods run.
    ``on_progress`` (method, round, clients done) replaces the progress bar (a sweep draws its own).
    """
    done = load_summaries(run_dir)
    if done:
        check_same_experiment(config, run_dir)
    todo = [m for m in config.methods if m not in done]
    if not todo:
        return [done[m] for m in config.methods]
    check_fits(config)  # a step that cannot fit its device stops here, before any weight is loaded
    exp = prepare_experiment(config)
    initial = initial_scores(exp)
    tracker = make_tracker(config.tracking, run_dir)
    methods = [*done, *(m for m in config.methods if m not in done)]
    dataclasses.replace(config, methods=tuple(methods)).save(run_dir / "config.toml")
    save_partition(exp, run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    checkpoint_dir = run_dir / "checkpoint"
    keep_rows(metrics_path, set(done), checkpointed_round(checkpoint_dir))
    summaries = dict(done)
    total = len(todo) * config.rounds * exp.num_clients
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(),
                  disable=not show_progress or on_progress is not None, transient=True) as progress:
        task = progress.add_task("starting", total=total)

        def bar(method: str, round_index: int, clients_done: int) -> None:
            progress.update(task, advance=1, description=f"{method} round {round_index}/{config.rounds} "
                                                         f"client {clients_done}/{exp.num_clients}")

        def step(method: str, round_index: int, clients_done: int) -> None:
            (on_progress or bar)(method, round_index, clients_done)
            if tracker is not None and clients_done == 1:  # the previous round's row is written by now
                tracker.sync()

        for method in todo:
            if config.engine == "flower":
                from fcmoe.fl.server_app import run_flower_method  # flwr is imported only when asked for

                def round_done(round_index: int, method: str = method) -> None:
                    for client in range(1, exp.num_clients + 1):  # the bar counts client-rounds
                        step(method, round_index, client)

                summary = run_flower_method(exp, method, run_dir, round_done)
            else:
                summary, final = run_method(exp, method, metrics_path, step, checkpoint_dir)
                save_final_model(run_dir, method, final)
            summaries[method] = summary
            save_summaries(run_dir, exp.setup_s, summaries, initial)
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the method is done: its final model is saved
            if tracker is not None:
                tracker.sync()
    if tracker is not None:
        tracker.close()
    return [summaries[m] for m in config.methods]
