"""The in-process engine: one readable round loop that drives any registered algorithm.

Per round t, every client trains in turn (sequentially; deterministic on CPU), the server aggregates, every client
applies its message, then global and local accuracy are measured and one line is appended to ``metrics.jsonl``.
The steps themselves (:mod:`fcmoe.rounds`) are shared with the Flower engine.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcmoe.algorithms import Algorithm, ClientUpdate, ServerResult
from fcmoe.core import Tree, tree_num_bytes
from fcmoe.experiment import Experiment
from fcmoe.process_memory import release_freed_memory
from fcmoe.rounds import (admit_updates, attack, finish_client, global_accuracy, initial_client_state,
                          local_accuracy, round_draw, round_metrics, train_client)
from fcmoe.sim.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

RoundCallback = Callable[[str, int, int], None]  # (method, round, clients done)


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

    @classmethod
    def from_row(cls, row: dict[str, Any], rounds: int, wall_s: float, device: str = "") -> MethodSummary:
        """The summary of a run whose last ``metrics.jsonl`` row is ``row``."""
        nan = float("nan")
        return cls(row["method"], row.get("global_acc", nan), row.get("local_acc_mean", nan),
                   row.get("local_acc_std", nan), rounds, wall_s, row.get("local_model_global_acc_mean", nan),
                   row.get("local_model_global_acc_std", nan), device)


def run_method(exp: Experiment, method: str, metrics_path: Path, on_progress: RoundCallback | None = None,
               checkpoint_dir: Path | None = None) -> tuple[MethodSummary, Tree]:
    """Run ``method`` for ``config.rounds`` rounds from the shared initial state; return its summary and model.

    Per round: the drawn clients train (``participation``), the ones that fail mid-round are lost, the server
    screens the arrivals (:func:`~fcmoe.rounds.screen_updates`) and aggregates the accepted ones if there are at
    least ``robust.min_clients`` (else it keeps the global model and marks the round skipped). Only clients whose
    update was aggregated apply the server's message; the others keep their private state (FC-MoE: the residual).
    With ``checkpoint_dir`` every round is checkpointed there, and an existing checkpoint of ``method`` is resumed.
    """
    cfg = exp.config
    algo: Algorithm = cfg.make_algorithm(method, exp.built.layout)
    trainer = exp.trainer
    global_state: Tree = exp.initial_state
    client_states: list[dict[str, Any]] = [initial_client_state(cfg.seed, i) for i in range(exp.num_clients)]
    first_round, row = 1, {}
    resumed = load_checkpoint(checkpoint_dir, method) if checkpoint_dir else None
    if resumed:
        global_state, client_states, first_round, row = (resumed.global_state, resumed.client_states,
                                                         resumed.round + 1, resumed.row)
        log.info("%s: resuming after round %d from %s", method, resumed.round, checkpoint_dir)
    model_bytes = tree_num_bytes(global_state)
    started = time.perf_counter()
    for round_index in range(first_round, cfg.rounds + 1):
        global_state, row = run_round(exp, algo, method, round_index, global_state, client_states, model_bytes,
                                      on_progress)
        append_row(metrics_path, row)
        if checkpoint_dir:
            save_checkpoint(checkpoint_dir, Checkpoint(method, round_index, global_state, client_states, row))
        log.info("%s round %d: global %.4f, local %.4f ± %.4f, loss %.4f, %.1f s", method, round_index,
                 row["global_acc"], row["local_acc_mean"], row["local_acc_std"], row["train_loss"], row["wall_s"])
        release_freed_memory()  # the round's updates (10 × 80 MB on the default) went with run_round's frame
    summary = MethodSummary.from_row(row, cfg.rounds, time.perf_counter() - started, trainer.device_name)
    return summary, global_state


def run_round(exp: Experiment, algo: Algorithm, method: str, round_index: int, global_state: Tree,
              client_states: list[dict[str, Any]], model_bytes: int,
              on_progress: RoundCallback | None = None) -> tuple[Tree, dict[str, Any]]:
    """One round: the drawn clients train, the server screens and aggregates, every client is scored.

    Returns the new global state and the round's ``metrics.jsonl`` row; ``client_states`` are updated in place.
    The round's updates live only in this function's frame, so they are freed when it returns.
    """
    cfg, trainer = exp.config, exp.trainer
    round_started = time.perf_counter()
    drawn, failed = round_draw(cfg.seed, round_index, exp.num_clients, cfg.participation.fraction,
                               cfg.participation.dropout)
    arrived: list[ClientUpdate] = []
    for done, cid in enumerate(drawn, start=1):
        if cid not in failed:  # a client that fails mid-round sends nothing: its training is not simulated
            update = train_client(algo, trainer, global_state, client_states[cid], exp.client_train[cid],
                                  cfg.seed, round_index, cid,
                                  exp.probe_test if round_index == cfg.rounds else None, cfg.sparse_uploads)
            arrived.append(attack(update, cfg.attack.kind, cfg.attack.factor)
                           if cid in cfg.attack.clients else update)
        if on_progress:
            on_progress(method, round_index, done)
    updates, rejected = admit_updates(arrived, global_state, algo.layout, cfg.robust.max_norm_ratio,
                                      cfg.robust.clip)
    for reason in rejected:
        log.warning("%s round %d: rejected %s", method, round_index, reason)
    skipped = len(updates) < cfg.robust.min_clients
    if skipped:
        log.warning("%s round %d: %d accepted update(s) < robust.min_clients = %d: global model kept", method,
                    round_index, len(updates), cfg.robust.min_clients)
        server = ServerResult(state=global_state)
    else:
        server = algo.aggregate(global_state, updates)
    for update in [] if skipped else updates:
        finish_client(algo, client_states[update.client_id], global_state, server.state,
                      server.messages.get(update.client_id))
    local = [local_accuracy(algo, trainer, client_states[cid], server.state, exp.client_train[cid],
                            exp.client_test[cid]) for cid in range(exp.num_clients)]
    row = round_metrics(method, round_index, [] if skipped else updates,
                        global_accuracy(trainer, server.state, exp.global_test), local, model_bytes,
                        server.messages, server.metrics, time.perf_counter() - round_started)
    row.update(participants=drawn, failed=failed, rejected=rejected, skipped=skipped)
    return server.state, row


def append_row(metrics_path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line to ``metrics.jsonl``."""
    with metrics_path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
