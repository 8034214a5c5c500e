"""The fcmoe ServerApp: one method of one experiment, through :class:`~fcmoe.fl.strategy.AlgorithmStrategy`.

Two ways in:
- ``fcmoe run --engine flower`` calls :func:`run_flower_method` for each method: Flower's simulation runtime with
  one virtual SuperNode per client, the ServerApp in this process (it reuses the prepared experiment for the
  global test set), the ClientApp in Ray actors.
- ``flwr run .`` (simulation or deployment) loads ``app`` below; its run config (``pyproject.toml``
  ``[tool.flwr.app.config]``) names a config file, ``key=value`` overrides, the method and the output folder.
Both write the same run-folder files as the in-process engine: one ``metrics.jsonl`` row per round (with
``engine = "flower"``, the rejected replies and whether the round was skipped), a checkpoint after every round
(``checkpoint/``: the global model, the server half's state and the round's row; the clients' state stays on
their nodes) and the final global model as ``model-<method>.safetensors``. A ServerApp started on a run folder
that holds a checkpoint of its method continues after that round; the nodes find their clients' state by the
run's state key (:func:`state_key`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import shutil
import signal
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w
import torch
from flwr.app import Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fcmoe.algorithms import ServerResult
from fcmoe.algorithms.robust import RobustAggregation
from fcmoe.cache import cache_dir
from fcmoe.checkpoint import Checkpoint, checkpointed_round, load_checkpoint, save_checkpoint
from fcmoe.config import load_config
from fcmoe.core import tree_num_bytes
from fcmoe.errors import Stopped
from fcmoe.experiment import Experiment, prepare_experiment
from fcmoe.fl.codec import RunSettings, global_accuracy_record, record_to_tree, tree_to_record
from fcmoe.fl.node_state import run_state_folder
from fcmoe.fl.strategy import AlgorithmStrategy
from fcmoe.metrics_row import GLOBAL_ACC
from fcmoe.rounds import ServerStep, global_scores, initial_scores, round_metrics, scored_clients, start_round
from fcmoe.runs import (
    MethodSummary,
    append_row,
    keep_rows,
    new_run_dir,
    save_final_model,
    save_partition,
    save_summaries,
)

log = logging.getLogger(__name__)

ROUND_TIMEOUT_S = RunSettings.round_timeout_s  # a later reply is dropped; Flower drops replies silently under ~60 s


def state_key(run_dir: Path, method: str) -> str:
    """The key nodes file this run's client state under: the run folder's name, a digest of its full path (two
    sweeps both have an ``alpha0.1-seed0``) and the method."""
    digest = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:10]
    return f"{run_dir.name}-{digest}-{method}"


def serve(grid: Grid, exp: Experiment, method: str, run_dir: Path, round_timeout_s: float = ROUND_TIMEOUT_S,
          device: str = "", on_round: Callable[[int], None] | None = None) -> MethodSummary:
    """Run ``method`` over the nodes of ``grid`` for ``config.rounds`` rounds; write its rows, checkpoints and
    final model. With a checkpoint of ``method`` in ``run_dir/checkpoint`` it continues after that round.

    ``round_timeout_s`` is Flower's ``send_and_receive`` timeout for each train and evaluate phase: replies later
    than that are dropped and the round aggregates the others. Keep it well above a round's duration. ``device``
    is where the clients trained, for the summary ("" = not known here: a deployment's nodes); ``on_round(t)`` is
    called once round t's row is written.
    """
    cfg = exp.config
    server = RobustAggregation(cfg.make_algorithm(method, exp.built.layout), cfg.robust)
    strategy = AlgorithmStrategy(server, tomli_w.dumps(cfg.to_dict()), exp.num_clients,
                                 lambda round_index: start_round(exp, round_index), method,
                                 scored=lambda round_index, draw: scored_clients(exp, round_index, draw),
                                 state_key=state_key(run_dir, method), memory_budget=cfg.server.budget,
                                 spill_dir=run_dir / "checkpoint" / "spill")
    checkpoint_dir = run_dir / "checkpoint"
    start_state, first_round = exp.initial_state, 1
    resumed = load_checkpoint(checkpoint_dir, method)
    if resumed:
        start_state, first_round = resumed.global_state, resumed.round + 1
        server.algorithm.load_server_state(resumed.server_state)
        log.info("%s: resuming after round %d from %s", method, resumed.round, checkpoint_dir)
    model_bytes = tree_num_bytes(exp.initial_state)
    metrics_path = run_dir / "metrics.jsonl"
    clock = {"round": time.perf_counter(), "start": time.perf_counter()}
    last: dict[str, Any] = dict(resumed.row) if resumed else {}

    def evaluate(server_round: int, arrays: Any) -> MetricRecord | None:
        if server_round == 0:
            return None
        state = strategy.round_state
        step = state.step or ServerStep(ServerResult(global_state=exp.initial_state), skipped=True)  # no train replies
        local = [state.local_acc.get(cid) for cid in range(exp.num_clients)]
        scored = cfg.eval.scores(server_round, cfg.rounds)
        scores = global_scores(exp, record_to_tree(arrays), server_round) if scored else {GLOBAL_ACC: math.nan}
        now = time.perf_counter()
        row = round_metrics(method, server_round, step, state.draw, scores, local, model_bytes,
                            now - clock["round"], now - (state.evaluation_started or now),
                            [state.deployed_global[cid] for cid in sorted(state.deployed_global)])
        row["engine"] = "flower"
        append_row(metrics_path, row)
        save_checkpoint(checkpoint_dir, Checkpoint(method, server_round, record_to_tree(arrays), [], row,
                                                   server.algorithm.server_state()))
        last.update(row)
        clock["round"] = time.perf_counter()
        if on_round is not None:
            on_round(server_round)
        return global_accuracy_record(row[GLOBAL_ACC])

    final = strategy.run_rounds(grid, tree_to_record(start_state), first_round, cfg.rounds, round_timeout_s,
                                evaluate)
    save_final_model(run_dir, method, record_to_tree(final))
    trained_on = ", ".join(sorted(strategy.client_devices)) or device  # what the clients said, else the caller's
    return MethodSummary.from_row({"method": method, **last}, cfg.rounds, time.perf_counter() - clock["start"],
                                  trained_on)


def client_resources(client_gpus: float, device: torch.device) -> dict[str, float]:
    """What each simulated client's Ray actor asks for: every core (clients train one after another, as in-process:
    deterministic, no oversubscription) and ``train.client_gpus`` of a GPU (−1: a whole one when local training
    runs on a GPU, else none). An actor given no GPU sees none, and would train on the CPU."""
    gpus = (1.0 if device.type == "cuda" else 0.0) if client_gpus < 0 else client_gpus
    return {"num_cpus": os.cpu_count() or 1, "num_gpus": gpus}


class _NotOurConcern(logging.Filter):
    """Drops Flower's notice that ``run_simulation`` is deprecated in favour of ``flwr run``: fcmoe calls it on
    purpose (``flwr run .`` is offered too), and a user of ``fcmoe run`` can do nothing about it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("DEPRECATED FEATURE" in message and "run_simulation" in message)


def run_flower_method(exp: Experiment, method: str, run_dir: Path, on_round: Callable[[int], None] | None = None,
                      ) -> MethodSummary:
    """``method`` in Flower's simulation runtime: one virtual SuperNode per client, the ClientApp in Ray;
    ``on_round(t)`` after each round's row. Flower's, Ray's and alembic's routine lines are kept off the terminal
    (warnings and errors still show) unless fcmoe logs at DEBUG."""
    verbose = logging.getLogger("fcmoe").isEnabledFor(logging.DEBUG)
    for name in ("flwr", "alembic", "ray"):  # before the import: importing Flower's state sets up alembic, noisily
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    from flwr.simulation import run_simulation

    from fcmoe.fl.client_app import app as client_app

    flower = logging.getLogger("flwr")
    flower.propagate = False  # Flower logs through its own handler; don't print every line twice
    if not verbose and not any(isinstance(f, _NotOurConcern) for f in flower.filters):
        flower.addFilter(_NotOurConcern())
    summaries: list[MethodSummary] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        summaries.append(serve(grid, exp, method, run_dir, device=exp.trainer.device_name, on_round=on_round))

    resources = client_resources(exp.config.train.client_gpus, exp.trainer.device)
    ray_init = {"include_dashboard": False, "logging_level": logging.DEBUG if verbose else logging.ERROR,
                "log_to_driver": verbose}
    with warnings.catch_warnings():
        if not verbose:  # Ray's advice on a GPU setting this run does not use
            warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
        try:
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=exp.num_clients,
                           backend_config={"client_resources": resources, "init_args": ray_init},
                           verbose_logging=verbose)
        except SystemExit as err:  # Ray's SIGTERM handler, installed as it starts, exits with the signal's number
            if err.code == signal.SIGTERM:
                raise Stopped(signal.SIGTERM) from None
            raise
    if not summaries:
        raise RuntimeError(f"the Flower simulation of {method!r} ended without a result; see the log above")
    # the simulated nodes share this machine's default state folder: a finished run's client state goes with it
    shutil.rmtree(run_state_folder(cache_dir() / "node-state", state_key(run_dir, method)), ignore_errors=True)
    return summaries[0]


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """``flwr run .``: config file, overrides, method, output folder and round timeout from the run config
    (:class:`~fcmoe.fl.codec.RunSettings`)."""
    settings = RunSettings.from_run_config(context.run_config)
    if settings.resume_dir:  # continue that run folder: its own config, the first method it has not finished
        run_dir = Path(settings.resume_dir)
        config = load_config(run_dir / "config.toml")
    else:
        config = load_config(settings.config_file or None, list(settings.overrides))
        # the saved config names the one method this run serves, so --resume knows it
        config = dataclasses.replace(config, methods=(settings.method or config.methods[0],))
        run_dir = new_run_dir(settings.out_dir or config.out_dir)
    method = settings.method or config.methods[0]
    exp = prepare_experiment(config)
    if not settings.resume_dir:
        config.save(run_dir / "config.toml")
        save_partition(exp, run_dir)
    checkpointed = checkpointed_round(run_dir / "checkpoint")
    keep_rows(run_dir / "metrics.jsonl", set(), checkpointed if checkpointed and checkpointed[0] == method else None)
    summary = serve(grid, exp, method, run_dir, settings.round_timeout_s)
    save_summaries(run_dir, exp.setup_s, {method: summary}, initial_scores(exp))
    shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)  # done: the final model is saved
    log.info("%s: global %.4f, local %.4f ± %.4f; run folder %s", method, summary.global_acc,
             summary.local_acc_mean, summary.local_acc_std, run_dir)
