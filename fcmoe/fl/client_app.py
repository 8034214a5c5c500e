"""The fcmoe ClientApp: receives a Flower message and has :func:`fcmoe.fl.client_work.handle` answer it.

In a deployment Flower starts one ``flwr-clientapp`` process per message (flwr #3670), so this module imports
nothing heavy: the process forwards the message to its node's long-lived worker (:mod:`fcmoe.fl.node_worker`),
which holds the prepared experiment. Where the ClientApp lives on (Flower's simulation) or with node config
``warm-worker = false``, it does the work itself (:func:`~fcmoe.fl.node_settings.warm_worker_enabled`).
"""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fcmoe.fl import IMPORTED_AT
from fcmoe.fl.node_settings import NODE_STATE, PhaseClock, warm_worker_enabled

app = ClientApp()
_clock = PhaseClock(IMPORTED_AT, time.time())


def _answer(kind: str, msg: Message, context: Context) -> Message:
    phases = _clock.pending()
    if warm_worker_enabled(context.node_config):
        from fcmoe.fl import node_worker  # POSIX only (Unix sockets); light: no torch

        reply, node_state = node_worker.forward(kind, msg.content, context.node_config, context.run_id, phases)
    else:
        started = time.perf_counter()
        from fcmoe.fl import client_work  # torch, transformers, the experiment: once per process

        phases["imports"] += time.perf_counter() - started
        reply, node_state = client_work.handle(kind, msg.content, context.node_config, context.run_id, phases)
    if node_state is not None:  # where the client's state is on this node; the state itself stays on its disk
        context.state[NODE_STATE] = ConfigRecord(node_state)
    return Message(content=reply, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Say which client this node is (asked once per node, before its first round)."""
    return _answer("query", msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training from the re-anchored global model; reply Δ_i, routing counts and n_i."""
    return _answer("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Apply the server's message to the private state, then score the deployed model on the local test split."""
    return _answer("evaluate", msg, context)
