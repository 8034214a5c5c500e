"""The fcmoe ServerApp: one method of one experiment, through :class:`~fcmoe.fl.strategy.AlgorithmStrategy`.

Two ways in:
- ``fcmoe run --engine flower`` calls :func:`run_flower_method` for each method: Flower's simulation runtime with
  one virtual SuperNode per client, the ServerApp in this process (it reuses the prepared experiment for the
  global test set), the ClientApp in Ray actors.
- ``flwr run .`` (simulation or deployment) loads ``app`` below; its run config (``pyproject.toml``
  ``[tool.flwr.app.config]``) names a config file, ``key=value`` overrides, the method and the output folder.
Both write the same run-folder files as the in-process engine: one ``metrics.jsonl`` row per round (with
``engine = "flower"``, the rejected replies and whether the round was skipped) and the final global model as
``model-<method>.safetensors``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import tomli_w
from flwr.app import Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fcmoe.algorithms.robust import RobustAggregation
from fcmoe.config import load_config
from fcmoe.core import tree_num_bytes
from fcmoe.experiment import Experiment, prepare_experiment
from fcmoe.fl.codec import RunSettings, global_accuracy_record, record_to_tree, tree_to_record
from fcmoe.fl.strategy import AlgorithmStrategy
from fcmoe.algorithms import ServerResult
from fcmoe.rounds import ServerStep, global_accuracy, round_metrics, start_round
from fcmoe.runs import MethodSummary, append_row, new_run_dir, save_final_model, save_partition

log = logging.getLogger(__name__)

ROUND_TIMEOUT_S = RunSettings.round_timeout_s  # a later reply is dropped; Flower drops replies silently under ~60 s


def serve(grid: Grid, exp: Experiment, method: str, run_dir: Path, round_timeout_s: float = ROUND_TIMEOUT_S,
          ) -> MethodSummary:
    """Run ``method`` over the nodes of ``grid`` for ``config.rounds`` rounds; write its rows and final model.

    ``round_timeout_s`` is Flower's ``send_and_receive`` timeout for each train and evaluate phase: replies later
    than that are dropped and the round aggregates the others. Keep it well above a round's duration.
    """
    cfg = exp.config
    server = RobustAggregation(cfg.make_algorithm(method, exp.built.layout), cfg.robust)
    strategy = AlgorithmStrategy(server, tomli_w.dumps(cfg.to_dict()), exp.num_clients,
                                 lambda round_index: start_round(exp, round_index), method,
                                 scores=lambda round_index: cfg.eval.scores(round_index, cfg.rounds))
    model_bytes = tree_num_bytes(exp.initial_state)
    metrics_path = run_dir / "metrics.jsonl"
    clock = {"round": time.perf_counter(), "start": time.perf_counter()}
    last: dict[str, Any] = {}

    def evaluate(server_round: int, arrays: Any) -> MetricRecord | None:
        if server_round == 0:
            return None
        state = strategy.round_state
        step = state.step or ServerStep(ServerResult(state=exp.initial_state), skipped=True)  # no train replies
        local = [state.local_acc.get(cid) for cid in range(exp.num_clients)]
        scored = cfg.eval.scores(server_round, cfg.rounds)
        global_acc = global_accuracy(exp.trainer, record_to_tree(arrays), exp.global_test) if scored else math.nan
        now = time.perf_counter()
        row = round_metrics(method, server_round, step, state.draw, global_acc, local, model_bytes,
                            now - clock["round"], now - (state.evaluation_started or now),
                            [state.deployed_global[cid] for cid in sorted(state.deployed_global)])
        row["engine"] = "flower"
        append_row(metrics_path, row)
        last.update(row)
        clock["round"] = time.perf_counter()
        return global_accuracy_record(row["global_acc"])

    result = strategy.start(grid, initial_arrays=tree_to_record(exp.initial_state), num_rounds=cfg.rounds,
                            timeout=round_timeout_s, evaluate_fn=evaluate)
    final = record_to_tree(result.arrays) if len(result.arrays) else exp.initial_state
    save_final_model(run_dir, method, final)
    return MethodSummary.from_row({"method": method, **last}, cfg.rounds, time.perf_counter() - clock["start"])


def run_flower_method(exp: Experiment, method: str, run_dir: Path) -> MethodSummary:
    """``method`` in Flower's simulation runtime: one virtual SuperNode per client, the ClientApp in Ray."""
    from flwr.simulation import run_simulation

    from fcmoe.fl.client_app import app as client_app

    logging.getLogger("flwr").propagate = False  # Flower logs through its own handler; don't print every line twice
    summaries: list[MethodSummary] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        summaries.append(serve(grid, exp, method, run_dir))

    # one actor with every core: clients train one after another, as in-process (deterministic, no oversubscription)
    resources = {"num_cpus": os.cpu_count() or 1, "num_gpus": 0.0}
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=exp.num_clients,
                   backend_config={"client_resources": resources, "init_args": {"include_dashboard": False}})
    if not summaries:
        raise RuntimeError(f"the Flower simulation of {method!r} ended without a result; see the log above")
    return summaries[0]


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """``flwr run .``: config file, overrides, method, output folder and round timeout from the run config
    (:class:`~fcmoe.fl.codec.RunSettings`)."""
    settings = RunSettings.from_run_config(context.run_config)
    config = load_config(settings.config_file or None, list(settings.overrides))
    method = settings.method or config.methods[0]
    exp = prepare_experiment(config)
    run_dir = new_run_dir(settings.out_dir or config.out_dir)
    config.save(run_dir / "config.toml")
    save_partition(exp, run_dir)
    summary = serve(grid, exp, method, run_dir, settings.round_timeout_s)
    log.info("%s: global %.4f, local %.4f ± %.4f; run folder %s", method, summary.global_acc,
             summary.local_acc_mean, summary.local_acc_std, run_dir)
