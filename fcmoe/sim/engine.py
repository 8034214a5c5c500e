"""The in-process engine: one readable round loop that drives any registered algorithm.

Per round t, for every client i (sequentially; deterministic on CPU):
    start_i = algo.client_start(θ_t, state_i)            # FC-MoE: θ_t + λ r_i
    Δ_i     = local_train(start_i) − start_i             # 1 epoch of AdamW, routing counted
then θ_{t+1}, messages = algo.aggregate(θ_t, [Δ_i…]); each client applies its message (FC-MoE residual);
then global accuracy (θ_{t+1} on the global test set) and local accuracy (each client's deployed model on its
own test split) are measured and one line is appended to ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fcmoe.algorithms import ALGORITHMS, Algorithm, ClientUpdate
from fcmoe.core import Tree, tree_num_bytes, tree_sub
from fcmoe.experiment import Experiment
from fcmoe.training.local import accuracy

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


def client_seed(seed: int, round_index: int, client_id: int) -> int:
    """A distinct, reproducible seed per (experiment seed, round, client)."""
    return seed * 1_000_003 + round_index * 1_009 + client_id


def run_method(exp: Experiment, method: str, metrics_path: Path, on_progress: RoundCallback | None = None,
               ) -> tuple[MethodSummary, Tree]:
    """Run ``method`` for ``config.rounds`` rounds from the shared initial state; return its summary and model."""
    cfg = exp.config
    algo: Algorithm = ALGORITHMS.get(method)(cfg.algorithm_config(method), exp.built.layout)
    trainer = exp.trainer
    global_state: Tree = exp.initial_state
    client_states: list[dict[str, Any]] = [{"seed": cfg.seed * 1000 + i} for i in range(exp.num_clients)]
    model_bytes = tree_num_bytes(global_state)
    started = time.perf_counter()
    row: dict[str, Any] = {}
    for round_index in range(1, cfg.rounds + 1):
        round_started = time.perf_counter()
        updates: list[ClientUpdate] = []
        for cid in range(exp.num_clients):
            start = algo.client_start(global_state, client_states[cid])
            result = trainer.train(start, exp.client_train[cid], client_seed(cfg.seed, round_index, cid))
            updates.append(ClientUpdate(cid, tree_sub(result.state, start), len(exp.client_train[cid]),
                                        result.routing_counts, {"loss": result.loss}))
            if on_progress:
                on_progress(method, round_index, cid + 1)
        server = algo.aggregate(global_state, updates)
        for update in updates:
            algo.client_finish(client_states[update.client_id], global_state, server.state,
                               server.messages.get(update.client_id))
        global_state = server.state
        row = _evaluate(exp, algo, global_state, client_states)
        row.update(method=method, round=round_index,
                   train_loss=sum(u.metrics["loss"] for u in updates) / len(updates),
                   utilisation=expert_utilisation(updates),
                   bytes_up=sum(tree_num_bytes(u.delta) + tree_num_bytes(u.routing_counts) + 8 for u in updates),
                   bytes_down=len(updates) * model_bytes + sum(tree_num_bytes(m) for m in server.messages.values()),
                   wall_s=time.perf_counter() - round_started, **server.metrics)
        with metrics_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        log.info("%s round %d: global %.4f, local %.4f ± %.4f, loss %.4f, %.1f s", method, round_index,
                 row["global_acc"], row["local_acc_mean"], row["local_acc_std"], row["train_loss"], row["wall_s"])
    summary = MethodSummary(method, row["global_acc"], row["local_acc_mean"], row["local_acc_std"], cfg.rounds,
                            time.perf_counter() - started)
    return summary, global_state


def expert_utilisation(updates: list[ClientUpdate]) -> dict[str, list[float]]:
    """Per MoE layer, the share of all clients' (non-padding) tokens routed to each expert."""
    out = {}
    for layer in updates[0].routing_counts:
        total = torch.stack([u.routing_counts[layer] for u in updates]).sum(dim=0).to(torch.float64)  # [E]
        out[layer] = (total / total.sum().clamp_min(1.0)).tolist()
    return out


def _evaluate(exp: Experiment, algo: Algorithm, global_state: Tree, client_states: list[dict[str, Any]],
              ) -> dict[str, Any]:
    trainer = exp.trainer
    global_acc = accuracy(trainer.predict(global_state, exp.global_test).logits, exp.global_test.labels)
    local = []
    for cid in range(exp.num_clients):
        logits = algo.personalised_logits(trainer, client_states[cid], global_state, exp.client_train[cid],
                                          exp.client_test[cid])
        local.append(accuracy(logits, exp.client_test[cid].labels))
    local_t = torch.tensor(local)
    return {"global_acc": global_acc, "local_acc": local, "local_acc_mean": local_t.mean().item(),
            "local_acc_std": local_t.std(unbiased=False).item()}
