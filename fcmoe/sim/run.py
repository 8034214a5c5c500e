"""One experiment: every method in turn (in-process engine, or Flower with ``engine = "flower"``), one run folder.

Run folder contents: ``config.toml`` (resolved), ``partition.json`` (client rows + label histograms),
``partition.png`` (clients × labels heatmap), ``metrics.jsonl`` (one line per method and round), ``summary.json``
(final figures per method, written after each method: a rerun into the same folder resumes after the last
finished method).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fcmoe.config import ExperimentConfig, load_config
from fcmoe.experiment import Experiment, prepare_experiment
from fcmoe.report.plots import partition_heatmap
from fcmoe.sim.checkpoint import checkpointed_round, save_final_model
from fcmoe.sim.engine import MethodSummary, RoundCallback, run_method

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
    exp = prepare_experiment(config)
    methods = [*done, *(m for m in config.methods if m not in done)]
    dataclasses.replace(config, methods=tuple(methods)).save(run_dir / "config.toml")
    save_partition(exp, run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    checkpoint_dir = run_dir / "checkpoint"
    keep_rows(metrics_path, set(done), checkpointed_round(checkpoint_dir))
    summaries = dict(done)
    total = len(todo) * config.rounds * exp.num_clients
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not show_progress or on_progress is not None, transient=True) as progress:
        task = progress.add_task("starting", total=total)

        def bar(method: str, round_index: int, clients_done: int) -> None:
            progress.update(task, advance=1, description=f"{method} round {round_index}/{config.rounds} "
                                                         f"client {clients_done}/{exp.num_clients}")

        for method in todo:
            if config.engine == "flower":
                from fcmoe.fl.server_app import run_flower_method  # the only path into flwr

                summary = run_flower_method(exp, method, run_dir)
            else:
                summary, final = run_method(exp, method, metrics_path, on_progress or bar, checkpoint_dir)
                save_final_model(run_dir, method, final)
            summaries[method] = summary
            (run_dir / "summary.json").write_text(json.dumps(
                {"setup_s": exp.setup_s, "methods": {m: dataclasses.asdict(s) for m, s in summaries.items()}},
                indent=2))
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the method is done: its final model is saved
    return [summaries[m] for m in config.methods]


def load_summaries(run_dir: Path) -> dict[str, MethodSummary]:
    """The finished methods of a run folder (its ``summary.json``), in the order they ran; ``{}`` if none."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return {}
    try:
        methods = json.loads(path.read_text())["methods"]
        return {name: MethodSummary(**fields) for name, fields in methods.items()}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a fcmoe summary ({err}); delete it to rerun that folder") from None


def check_same_experiment(config: ExperimentConfig, run_dir: Path) -> None:
    """Raise unless ``run_dir/config.toml`` describes ``config`` (methods, out_dir and the sweep grid may differ)."""
    saved = load_config(run_dir / "config.toml").to_dict()
    wanted = config.to_dict()
    for key in ("methods", "out_dir", "sweep"):
        saved.pop(key, None), wanted.pop(key, None)
    if saved != wanted:
        differing = sorted(_differences(saved, wanted))
        raise ValueError(f"{run_dir} holds a different experiment ({', '.join(differing[:3])} differ); "
                         "choose another output folder")


def keep_rows(metrics_path: Path, methods: set[str], checkpointed: tuple[str, int] | None = None) -> None:
    """Drop the ``metrics.jsonl`` rows of methods not in ``methods`` (left by an interrupted run), except those of
    the ``checkpointed`` (method, round) up to that round, from which the method resumes."""
    if not metrics_path.is_file():
        return

    def keep(row: dict) -> bool:
        if row.get("method") in methods:
            return True
        return checkpointed is not None and row.get("method") == checkpointed[0] and row["round"] <= checkpointed[1]

    lines = metrics_path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and keep(json.loads(line))]
    if len(kept) != len(lines):
        log.info("%s: dropping %d rows of interrupted methods", metrics_path, len(lines) - len(kept))
        metrics_path.write_text("".join(line + "\n" for line in kept))


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


def save_partition(exp: Experiment, run_dir: Path) -> None:
    """``partition.json`` (rows and label histograms) and ``partition.png`` (clients × labels heatmap)."""
    exp.partition.save(run_dir / "partition.json", exp.pool.labels, exp.pool.label_names)
    hist = exp.partition.histograms(exp.pool.labels)
    counts = np.array(hist["train"]) + np.array(hist["test"])  # [clients, labels]
    part = exp.config.partition
    detail = f"α = {part.alpha}" if part.kind == "dirichlet" else part.kind
    partition_heatmap(counts, exp.pool.label_names, run_dir / "partition.png",
                      f"{exp.config.data.name}: {exp.num_clients} clients, {detail}, seed {exp.config.seed}")
