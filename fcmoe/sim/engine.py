"""The in-process engine: one readable round loop that drives any registered algorithm.

Per round t the drawn clients train in turn (sequentially; deterministic on CPU), the server screens and
aggregates, every aggregated client applies its message, then global and local accuracy are measured and one
line is appended to ``metrics.jsonl``. The steps themselves are :mod:`fcmoe.rounds`, shared with the Flower engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fcmoe.algorithms.robust import RobustAggregation
from fcmoe.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fcmoe.core import Tree, tree_num_bytes
from fcmoe.experiment import Experiment
from fcmoe.metrics_row import GLOBAL_ACC, LOCAL_ACC_MEAN, LOCAL_ACC_STD, TRAIN_LOSS
from fcmoe.rounds import (
    client_step,
    deployed_global_accuracy,
    finish_client,
    global_scores,
    initial_client_state,
    local_accuracy,
    round_metrics,
    scored_clients,
    server_step,
    start_round,
)
from fcmoe.runs import MethodSummary, append_row
from fcmoe.sim.client_states import ClientStates
from fcmoe.spill import UpdateInbox

log = logging.getLogger(__name__)

RoundCallback = Callable[[str, int, int], None]  # (method, round, clients done)


def run_method(exp: Experiment, method: str, metrics_path: Path, on_progress: RoundCallback | None = None,
               checkpoint_dir: Path | None = None) -> tuple[MethodSummary, Tree]:
    """Run ``method`` for ``config.rounds`` rounds from the shared initial state; return its summary and model.

    With ``checkpoint_dir`` every round is checkpointed there, and an existing checkpoint of ``method`` is resumed.
    Client states live in memory or, with a few of many clients drawn a round, in that folder between the rounds
    they take part in (:class:`~fcmoe.sim.client_states.ClientStates`).
    """
    cfg = exp.config
    server = RobustAggregation(cfg.make_algorithm(method, exp.built.layout), cfg.robust)
    global_state: Tree = exp.initial_state
    states, files = [initial_client_state(cfg.seed, i) for i in range(exp.num_clients)], None
    first_round, row = 1, {}
    resumed = load_checkpoint(checkpoint_dir, method) if checkpoint_dir else None
    if resumed:
        global_state, states, files, first_round, row = (resumed.global_state, resumed.client_states,
                                                         resumed.client_files, resumed.round + 1, resumed.row)
        server.algorithm.load_server_state(resumed.server_state)
        log.info("%s: resuming after round %d from %s", method, resumed.round, checkpoint_dir)
    client_states = ClientStates(states, files, checkpoint_dir, resident=cfg.participation.fraction >= 1.0)
    started = time.perf_counter()
    for round_index in range(first_round, cfg.rounds + 1):
        global_state, row = run_round(exp, server, method, round_index, global_state, client_states, on_progress,
                                      checkpoint_dir and checkpoint_dir / "spill")
        append_row(metrics_path, row)
        if checkpoint_dir:
            save_checkpoint(checkpoint_dir, client_states.checkpoint(Checkpoint(
                method, round_index, global_state, [], row, server.algorithm.server_state())))
        log.info("%s round %d: global %.4f, local %.4f ± %.4f, loss %.4f, %.1f s (evaluation %.1f s)", method,
                 round_index, row[GLOBAL_ACC], row[LOCAL_ACC_MEAN], row[LOCAL_ACC_STD], row[TRAIN_LOSS],
                 row["wall_s"], row["eval_s"])
    summary = MethodSummary.from_row(row, cfg.rounds, time.perf_counter() - started, exp.trainer.device_name)
    return summary, global_state


def run_round(exp: Experiment, server: RobustAggregation, method: str, round_index: int, global_state: Tree,
              client_states: ClientStates, on_progress: RoundCallback | None = None,
              spill_dir: Path | None = None) -> tuple[Tree, dict[str, Any]]:
    """One round: the drawn clients train, the server screens and aggregates, the clients of
    :func:`~fcmoe.rounds.scored_clients` are scored.

    Returns the new global state and the round's ``metrics.jsonl`` row; ``client_states`` are updated in place.
    The round's updates live only in this function's frame, so they are freed when it returns; those beyond
    ``server.memory_budget`` wait in ``spill_dir`` (a temporary folder when ``None``) until aggregated.
    """
    algo = server.algorithm
    round_started = time.perf_counter()
    draw = start_round(exp, round_index)
    with UpdateInbox(exp.config.server.budget, spill_dir) as inbox:  # beyond server.memory_budget: on disk
        for done, cid in enumerate(draw.drawn, start=1):
            if cid in draw.training:  # a client that fails mid-round sends nothing: its training is not simulated
                inbox.add(client_step(exp, algo, cid, round_index, global_state, client_states[cid]))
            if on_progress:
                on_progress(method, round_index, done)
        step = server_step(server, global_state, inbox.updates, label=f"{method} round {round_index}")
    new_state = step.result.global_state
    for update in step.accepted:
        finish_client(algo, client_states[update.client_id], global_state, new_state,
                      step.result.messages.get(update.client_id))
    eval_started = time.perf_counter()
    local: list[float | None] = [None] * exp.num_clients  # None: not scored this round (eval.every, eval.clients)
    scores: dict[str, Any] = {GLOBAL_ACC: float("nan")}
    deployed = []
    if exp.config.eval.scores(round_index, exp.config.rounds):
        scored = scored_clients(exp, round_index, draw)
        for cid in scored:
            local[cid] = local_accuracy(exp, algo, cid, client_states[cid], new_state)
        scores = global_scores(exp, new_state, round_index)
        deployed = [deployed_global_accuracy(exp, algo, client_states[cid], new_state, round_index) for cid in scored]
    row = round_metrics(method, round_index, step, draw, scores, local, tree_num_bytes(global_state),
                        time.perf_counter() - round_started, time.perf_counter() - eval_started,
                        [a for a in deployed if a is not None])
    return new_state, row
