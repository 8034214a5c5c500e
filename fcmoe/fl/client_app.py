"""The fcmoe ClientApp: the client half of every algorithm, on one client's data, as a Flower app.

A node learns which client it is from its node config (:func:`~fcmoe.fl.codec.partition_id`) and what experiment
to run from the resolved config the server sends. It builds that experiment once per process (data, partition,
model, cached features: the same seeded steps as the in-process engine, so the same client data), runs the
shared :func:`fcmoe.rounds.client_step`, and keeps its private state (FC-MoE residual, PFL-MoE head and gate, and
the global model it trained from) in files on its own disk (:class:`~fcmoe.fl.node_state.NodeStateStore`): it
never leaves the node, survives a SuperNode restart, and ``context.state`` only says where it is. Which clients
train in a round is the server's decision: a node is only messaged when its client trains.
"""

from __future__ import annotations

import functools
import hashlib
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

import fcmoe
from fcmoe.algorithms import Algorithm
from fcmoe.config import build_config
from fcmoe.experiment import Experiment, prepare_experiment
from fcmoe.fl import IMPORTED_AT
from fcmoe.fl.codec import (ARRAYS, MESSAGE, NODE_STATE, Instruction, decode_instruction, decode_message,
                            encode_evaluation, encode_identity, encode_update, partition_id, record_to_tree)
from fcmoe.fl.node_state import NodeStateStore, PhaseClock, node_root, use_warm_folder, warm_cache_enabled
from fcmoe.rounds import client_step, deployed_global_accuracy, finish_client, initial_client_state, local_accuracy

app = ClientApp()
_clock = PhaseClock(IMPORTED_AT, time.time())


@functools.lru_cache(maxsize=2)
def _experiment(config_text: str, feature_cache: Path | None) -> Experiment:
    config = build_config(tomllib.loads(config_text))
    if config.train.threads:  # this process is the message's own: Flower starts one per message
        torch.set_num_threads(config.train.threads)
    return prepare_experiment(config, feature_cache)


def warm_folder(node_config: Mapping[str, Any], config_text: str) -> Path | None:
    """Where this node caches the frozen features of the experiment ``config_text`` (``None``: ``warm-cache =
    false`` in the node config). Keyed by the config's and fcmoe's version digest, so nodes on one machine share
    one copy and an upgraded fcmoe never reads an older one's features; only the last few are kept
    (:func:`~fcmoe.fl.node_state.use_warm_folder`)."""
    if not warm_cache_enabled(node_config):
        return None
    digest = hashlib.sha256(f"{fcmoe.__version__}\n{config_text}".encode()).hexdigest()[:16]
    return use_warm_folder(node_root(node_config), digest)


def _setup(msg: Message, context: Context) -> tuple[Experiment, Algorithm, int, NodeStateStore, Instruction]:
    instruction = decode_instruction(msg.content)
    exp = _experiment(instruction.experiment, warm_folder(context.node_config, instruction.experiment))
    algo = exp.config.make_algorithm(instruction.method, exp.built.layout)
    cid = partition_id(context.node_config)
    if not 0 <= cid < exp.num_clients:
        raise ValueError(f"partition-id = {cid}: this experiment has clients 0..{exp.num_clients - 1}")
    store = NodeStateStore.for_node(context.node_config, instruction.state_key or f"run-{context.run_id}", cid)
    context.state[NODE_STATE] = ConfigRecord({"folder": str(store.folder), "round": instruction.server_round})
    return exp, algo, cid, store, instruction


def _state_before(exp: Experiment, store: NodeStateStore, cid: int, round_index: int) -> dict[str, Any]:
    """The client's state at the end of its newest round before ``round_index`` (its initial state if none)."""
    return store.load_before(round_index) or initial_client_state(exp.config.seed, cid)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Say which client this node is (asked once per node, before its first round)."""
    return Message(content=encode_identity(partition_id(context.node_config)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training from the re-anchored global model; reply Δ_i, routing counts and n_i."""
    _clock.begin()
    exp, algo, cid, store, instruction = _setup(msg, context)
    _clock.mark("setup")
    round_index = instruction.server_round
    state = _state_before(exp, store, cid, round_index)
    global_state = record_to_tree(msg.content[ARRAYS])
    update = client_step(exp, algo, cid, round_index, global_state, state)
    store.save_trained(round_index, state, global_state)
    _clock.mark("work")
    reply = Message(content=encode_update(update, algo.layout), reply_to=msg)
    _clock.mark("reply")
    store.record_phases("train", round_index, _clock.finish())
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Apply the server's message to the private state, then score the deployed model on the local test split."""
    _clock.begin()
    exp, algo, cid, store, instruction = _setup(msg, context)
    _clock.mark("setup")
    round_index = instruction.server_round
    new_global = record_to_tree(msg.content[ARRAYS])
    trained = store.load_trained(round_index)
    if trained is None:  # not drawn this round: the state of its last round
        state = _state_before(exp, store, cid, round_index)
    else:
        state, old_global = trained
        if instruction.trained:
            finish_client(algo, state, old_global, new_global, decode_message(msg.content.get(MESSAGE)))
    acc = local_accuracy(exp, algo, cid, state, new_global) if instruction.score else float("nan")
    deployed = (deployed_global_accuracy(exp, algo, state, new_global, round_index)
                if instruction.score else None)
    store.save_done(round_index, state)
    _clock.mark("work")
    reply = Message(content=encode_evaluation(cid, acc, len(exp.client_test[cid]), deployed), reply_to=msg)
    _clock.mark("reply")
    store.record_phases("evaluate", round_index, _clock.finish())
    return reply
