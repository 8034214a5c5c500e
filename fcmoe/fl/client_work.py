"""The work of the fcmoe ClientApp: the client half of every algorithm, on one client's data.

:func:`handle` answers one Flower message's content, wherever it runs: in the ClientApp process itself (Flower's
simulation, or node config ``warm-worker = false``) or in the node's worker (:mod:`fcmoe.fl.node_worker`), to which
the ClientApp only forwards. A node learns which client it is from its node config
(:func:`~fcmoe.fl.node_settings.partition_id`) and what experiment to run from the resolved config the server
sends. It builds that experiment once per process (data, partition, model, cached features: the same seeded steps
as the in-process engine, so the same client data), runs the shared :func:`fcmoe.rounds.client_step`, and keeps
its private state (FC-MoE residual, PFL-MoE head and gate, and the global model it trained from) in files on its
own disk (:class:`~fcmoe.fl.node_state.NodeStateStore`): it never leaves the node and survives a SuperNode
restart. Which clients train in a round is the server's decision: a node is only messaged when its client trains.
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
from flwr.app import RecordDict

import fcmoe
from fcmoe.algorithms import Algorithm
from fcmoe.config import build_config
from fcmoe.experiment import Experiment, prepare_experiment
from fcmoe.fl import IMPORTED_AT
from fcmoe.fl.codec import (
    ARRAYS,
    MESSAGE,
    Instruction,
    decode_instruction,
    decode_message,
    encode_evaluation,
    encode_identity,
    encode_update,
    record_to_tree,
)
from fcmoe.fl.node_settings import PhaseClock, node_root, partition_id, warm_cache_enabled
from fcmoe.fl.node_state import NodeStateStore, one_featurises, use_warm_folder
from fcmoe.rounds import client_step, deployed_global_accuracy, finish_client, initial_client_state, local_accuracy

KINDS = ("query", "train", "evaluate")  # the Flower message types the ClientApp answers
_clock = PhaseClock(IMPORTED_AT, time.time())


@functools.lru_cache(maxsize=2)
def _experiment(config_text: str, feature_cache: Path | None) -> Experiment:
    with one_featurises(feature_cache):
        return prepare_experiment(build_config(tomllib.loads(config_text)), feature_cache)


def experiments_prepared() -> int:
    """How many experiments this process has built (a warm worker builds each once)."""
    return _experiment.cache_info().misses


def warm_folder(node_config: Mapping[str, Any], config_text: str) -> Path | None:
    """Where this node caches the frozen features of the experiment ``config_text`` (``None``: ``warm-cache =
    false`` in the node config). Keyed by the config's and fcmoe's version digest, so nodes on one machine share
    one copy and an upgraded fcmoe never reads an older one's features; only the last few are kept
    (:func:`~fcmoe.fl.node_state.use_warm_folder`)."""
    if not warm_cache_enabled(node_config):
        return None
    digest = hashlib.sha256(f"{fcmoe.__version__}\n{config_text}".encode()).hexdigest()[:16]
    return use_warm_folder(node_root(node_config), digest)


def handle(kind: str, content: RecordDict, node_config: Mapping[str, Any], run_id: int,
           phases: Mapping[str, float] | None = None) -> tuple[RecordDict, dict[str, Any] | None]:
    """Answer one message: (the reply's content, the node-state note for ``context.state`` or ``None``).

    ``phases`` are the seconds the forwarding ClientApp process already spent (its start, imports, reaching the
    worker); this message's row in ``phases.jsonl`` adds set-up, work and reply to them.
    """
    if kind == "query":  # which client this node is (asked once per node, before its first round)
        return encode_identity(partition_id(node_config)), None
    if kind not in KINDS:
        raise ValueError(f"message type {kind!r}: the fcmoe ClientApp answers {', '.join(KINDS)}")
    _clock.begin(phases)
    instruction = decode_instruction(content)
    exp = _experiment(instruction.experiment, warm_folder(node_config, instruction.experiment))
    if exp.config.train.threads:  # per message: a worker may hold experiments with different counts
        torch.set_num_threads(exp.config.train.threads)
    algo = exp.config.make_algorithm(instruction.method, exp.built.layout)
    cid = partition_id(node_config)
    if not 0 <= cid < exp.num_clients:
        raise ValueError(f"partition-id = {cid}: this experiment has clients 0..{exp.num_clients - 1}")
    store = NodeStateStore.for_node(node_config, instruction.state_key or f"run-{run_id}", cid)
    _clock.mark("setup")
    work = _train if kind == "train" else _evaluate
    reply = work(exp, algo, cid, store, instruction, content)
    store.record_phases(kind, instruction.server_round, _clock.finish())
    return reply, {"folder": str(store.folder), "round": instruction.server_round}


def _state_before(exp: Experiment, store: NodeStateStore, cid: int, round_index: int) -> dict[str, Any]:
    """The client's state at the end of its newest round before ``round_index`` (its initial state if none)."""
    return store.load_before(round_index) or initial_client_state(exp.config.seed, cid)


def _train(exp: Experiment, algo: Algorithm, cid: int, store: NodeStateStore, instruction: Instruction,
           content: RecordDict) -> RecordDict:
    """Local training from the re-anchored global model; reply Δ_i, routing counts and n_i."""
    round_index = instruction.server_round
    state = _state_before(exp, store, cid, round_index)
    global_state = record_to_tree(content[ARRAYS])
    update = client_step(exp, algo, cid, round_index, global_state, state)
    store.save_trained(round_index, state, global_state)
    _clock.mark("work")
    reply = encode_update(update, algo.layout, exp.trainer.device_name)
    _clock.mark("reply")
    return reply


def _evaluate(exp: Experiment, algo: Algorithm, cid: int, store: NodeStateStore, instruction: Instruction,
              content: RecordDict) -> RecordDict:
    """Apply the server's message to the private state, then score the deployed model on the local test split."""
    round_index = instruction.server_round
    new_global = record_to_tree(content[ARRAYS])
    trained = store.load_trained(round_index)
    if trained is None:  # not drawn this round: the state of its last round
        state = _state_before(exp, store, cid, round_index)
    else:
        state, old_global = trained
        if instruction.trained:
            finish_client(algo, state, old_global, new_global, decode_message(content.get(MESSAGE)))
    acc = local_accuracy(exp, algo, cid, state, new_global) if instruction.score else float("nan")
    deployed = (deployed_global_accuracy(exp, algo, state, new_global, round_index)
                if instruction.score else None)
    store.save_done(round_index, state)
    _clock.mark("work")
    reply = encode_evaluation(cid, acc, len(exp.client_test[cid]), deployed)
    _clock.mark("reply")
    return reply
