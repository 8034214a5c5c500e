"""The fcmoe ClientApp: the client half of every algorithm, on one client's data, as a Flower app.

A node learns which client it is from ``node_config["partition-id"]`` (simulation sets it; a SuperNode gets
``--node-config "partition-id=3"``) and what experiment to run from the resolved config the server sends. It
builds that experiment once per process (data, partition, model, cached features: the same seeded steps as the
in-process engine, so the same client data), trains with :func:`fcmoe.rounds.train_client`, and keeps its private
state (FC-MoE residual, PFL-MoE head and gate, and the global model it trained from) in ``context.state``: it
never leaves the node.
"""

from __future__ import annotations

import functools
from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fcmoe.algorithms import Algorithm
from fcmoe.config import ExperimentConfig, build_config
from fcmoe.experiment import Experiment, prepare_experiment
from fcmoe.fl.codec import (ABSENT, STATE_SCALARS, UPDATE, decode_message, encode_update, load_client_state,
                            record_to_tree, save_client_state)
from fcmoe.fl.strategy import ARRAYS, CONFIG, MESSAGE, METRICS
from fcmoe.rounds import attack, finish_client, initial_client_state, local_accuracy, round_draw, train_client


TRAINED_FROM = "trained-from"  # context.state key: the global arrays of this round's training (θ_t)

app = ClientApp()


@functools.lru_cache(maxsize=2)
def _experiment(config_text: str) -> Experiment:
    import tomllib

    return prepare_experiment(build_config(tomllib.loads(config_text)))


def _setup(msg: Message, context: Context) -> tuple[Experiment, ExperimentConfig, Algorithm, int, dict[str, Any]]:
    settings = msg.content[CONFIG]
    exp = _experiment(str(settings["fcmoe-config"]))
    cfg = exp.config
    method = str(settings["method"])
    algo = cfg.make_algorithm(method, exp.built.layout)
    cid = int(context.node_config["partition-id"])
    if not 0 <= cid < exp.num_clients:
        raise ValueError(f"partition-id = {cid}: this experiment has clients 0..{exp.num_clients - 1}")
    fresh = STATE_SCALARS not in context.state
    state = initial_client_state(cfg.seed, cid) if fresh else load_client_state(context.state)
    return exp, cfg, algo, cid, state


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training from the re-anchored global model; reply Δ_i, routing counts and n_i."""
    exp, cfg, algo, cid, state = _setup(msg, context)
    round_index = int(msg.content[CONFIG]["server-round"])
    drawn, failed = round_draw(cfg.seed, round_index, exp.num_clients, cfg.participation.fraction,
                               cfg.participation.dropout)
    if cid not in drawn:
        return Message(content=RecordDict({UPDATE: MetricRecord({"client_id": cid, ABSENT: 1})}), reply_to=msg)
    if cid in failed:  # fault injection: fail mid-round
        raise RuntimeError(f"client {cid} failed mid-round {round_index} (participation.dropout = "
                           f"{cfg.participation.dropout})")
    global_state = record_to_tree(msg.content[ARRAYS])
    update = train_client(algo, exp.trainer, global_state, state, exp.client_train[cid], cfg.seed, round_index, cid,
                          exp.probe_test if round_index == cfg.rounds else None, cfg.sparse_uploads)
    if cid in cfg.attack.clients:  # fault injection for robustness experiments
        update = attack(update, cfg.attack.kind, cfg.attack.factor)
    context.state[TRAINED_FROM] = msg.content[ARRAYS]
    save_client_state(state, context.state)
    return Message(content=encode_update(update, algo.layout), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Apply the server's message to the private state, then score the deployed model on the local test split."""
    exp, _, algo, cid, state = _setup(msg, context)
    new_global = record_to_tree(msg.content[ARRAYS])
    if msg.content[CONFIG]["trained"] and TRAINED_FROM in context.state:
        old_global = record_to_tree(context.state[TRAINED_FROM])
        finish_client(algo, state, old_global, new_global, decode_message(msg.content.get(MESSAGE)))
    acc = local_accuracy(algo, exp.trainer, state, new_global, exp.client_train[cid], exp.client_test[cid])
    save_client_state(state, context.state)
    metrics = MetricRecord({"client_id": cid, "local_acc": acc, "num-examples": len(exp.client_test[cid])})
    return Message(content=RecordDict({METRICS: metrics}), reply_to=msg)
