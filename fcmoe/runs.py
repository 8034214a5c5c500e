"""Run-folder I/O, below both engines: what a run folder holds and how each file is written and read.

A run folder holds ``config.toml`` (the resolved experiment), ``partition.json`` (client rows and label
histograms) and ``partition.png``, ``metrics.jsonl`` (one line per method and round), ``summary.json`` (the final
figures of every finished method) and ``model-<method>.safetensors`` (each method's final global model). The
in-process engine adds ``checkpoint/`` while a method runs (:mod:`fcmoe.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import save_file

from fcmoe.config import ExperimentConfig, load_config
from fcmoe.core import Tree
from fcmoe.errors import first_line
from fcmoe.experiment import Experiment
from fcmoe.metrics_row import GLOBAL_ACC, LOCAL_ACC_MEAN, LOCAL_ACC_STD, MMLU_ACC, TASK_SCORES
from fcmoe.plots import partition_heatmap

log = logging.getLogger(__name__)


@dataclass
class MethodSummary:
    """Final figures of one method's run (``summary.json``)."""

    method: str
    global_acc: float
    local_acc_mean: float
    local_acc_std: float
    rounds: int
    wall_s: float
    local_model_global_acc_mean: float = float("nan")  # each client's local model on the global test set
    local_model_global_acc_std: float = float("nan")
    device: str = ""  # where local training ran: "cpu" or the GPU's name ("" = not recorded: Flower clients)
    deployed_global_acc_mean: float = float("nan")  # PFL-MoE: the clients' mixtures on the global test set
    # instruction tuning: MMLU zero-shot accuracy of the final global model, and its score per task
    mmlu_acc: float = float("nan")
    task_scores: dict[str, float] | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any], rounds: int, wall_s: float, device: str = "") -> MethodSummary:
        """The summary of a run whose last ``metrics.jsonl`` row is ``row``."""
        nan = float("nan")
        return cls(row["method"], row.get(GLOBAL_ACC, nan), row.get(LOCAL_ACC_MEAN, nan),
                   row.get(LOCAL_ACC_STD, nan), rounds, wall_s, row.get("local_model_global_acc_mean", nan),
                   row.get("local_model_global_acc_std", nan), device, row.get("deployed_global_acc_mean", nan),
                   row.get(MMLU_ACC, nan), row.get(TASK_SCORES))


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


def append_row(metrics_path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line to ``metrics.jsonl``."""
    with metrics_path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


class RunFolderError(ValueError):
    """A file of a run folder that cannot be read; the message names it (and the line, in a JSON Lines file)."""


def jsonl_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, row) of every non-empty line of a JSON Lines file (``[]`` if there is none); a damaged line is a
    :class:`RunFolderError` naming the file and the line."""
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise RunFolderError(f"cannot read {path}: {first_line(err)}") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise RunFolderError(f"{path} line {number} is not JSON ({err.msg} at column {err.colno}); delete that "
                                 "line or rerun the method") from None
        if not isinstance(row, dict):
            raise RunFolderError(f"{path} line {number} is not a metrics row (a JSON object)")
        rows.append((line, row))
    return rows


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON Lines file (``[]`` if there is none); see :func:`jsonl_lines`."""
    return [row for _, row in jsonl_lines(path)]


def keep_rows(metrics_path: Path, methods: set[str], checkpointed: tuple[str, int] | None = None) -> None:
    """Drop the ``metrics.jsonl`` rows of methods not in ``methods`` (left by an interrupted run), except those of
    the ``checkpointed`` (method, round) up to that round, from which the method resumes. A damaged row is a
    :class:`RunFolderError` naming its line."""
    def keep(row: dict) -> bool:
        if row.get("method") in methods:
            return True
        return (checkpointed is not None and row.get("method") == checkpointed[0]
                and row.get("round", 0) <= checkpointed[1])

    lines = jsonl_lines(metrics_path)
    kept = [line for line, row in lines if keep(row)]
    if len(kept) != len(lines):
        log.info("%s: dropping %d rows of interrupted methods", metrics_path, len(lines) - len(kept))
        metrics_path.write_text("".join(line + "\n" for line in kept))


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


def save_summaries(run_dir: Path, setup_s: float, summaries: dict[str, MethodSummary],
                   initial: dict[str, float] | None = None) -> None:
    """``summary.json``: the set-up time, the initial model's scores (round 0, :func:`fcmoe.rounds.initial_scores`)
    and every finished method's :class:`MethodSummary`."""
    content: dict[str, Any] = {"setup_s": setup_s}
    if initial is not None:
        content["initial"] = initial
    content["methods"] = {m: dataclasses.asdict(s) for m, s in summaries.items()}
    (run_dir / "summary.json").write_text(json.dumps(content, indent=2))


def save_final_model(run_dir: Path, method: str, state: Tree) -> Path:
    """``model-<method>.safetensors`` in ``run_dir`` (a variant's "/" becomes "_"), for either engine."""
    path = run_dir / f"model-{method.replace('/', '_')}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


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
