"""One generic Flower ``Strategy`` that delegates aggregation to any registered fcmoe algorithm.

Per round (Flower's ``Strategy.start`` loop):
- ``configure_train``: keep the global arrays (Flower does not pass them to ``aggregate_train``) and send them to
  every node with the round, the method and the resolved experiment config (TOML text: clients build the same
  experiment from it);
- ``aggregate_train``: skip the replies of clients not drawn this round, decode and screen the others with the
  in-process engine's :func:`~fcmoe.rounds.screen_updates` (error replies, undecodable content, wrong keys /
  shapes / dtypes, NaN or Inf, bad routing counts, a norm above ``max_norm_ratio`` × the round's median are
  rejected with a logged reason and counted), order the updates by client id, and call the algorithm's server
  half; fewer than ``min_updates`` accepted updates keep the global model and mark the round skipped;
- ``configure_evaluate``: send the new global arrays and each client's own message (FC-MoE: one scalar per
  MoE layer and expert) to the node that trained it;
- ``aggregate_evaluate``: collect each client's local accuracy (its deployed model on its own test split).
The strategy keeps what the ServerApp needs for the ``metrics.jsonl`` row in :attr:`round_state`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fcmoe.algorithms import Algorithm, ClientUpdate, ServerResult
from fcmoe.core import Tree
from fcmoe.process_memory import release_freed_memory
from fcmoe.rounds import admit_updates
from fcmoe.fl.codec import (ABSENT, UPDATE, MalformedReply, decode_update, encode_message, record_to_tree,
                            tree_to_record)

log = logging.getLogger(__name__)

ARRAYS, CONFIG, MESSAGE, METRICS = "arrays", "config", "message", "metrics"


@dataclass
class RoundState:
    """What one round produced, for the ServerApp's metrics row."""

    updates: list[ClientUpdate] = field(default_factory=list)
    result: ServerResult | None = None
    rejected: list[str] = field(default_factory=list)  # "client/node: reason"
    local_acc: dict[int, float] = field(default_factory=dict)  # client id → accuracy
    skipped: bool = False


class AlgorithmStrategy(Strategy):
    """Flower strategy driving an fcmoe :class:`~fcmoe.algorithms.Algorithm`.

    Parameters
    ----------
    algorithm
        The server half (its ``aggregate``) and the name clients use to build their half.
    config_text
        The resolved experiment config as TOML, sent to clients.
    num_nodes
        Nodes to wait for before round 1 (every client trains every round).
    min_updates
        Valid updates needed to aggregate; fewer keep the global model.
    node_wait_s
        How long the first round waits for ``num_nodes`` nodes before going on with those connected.
    method
        The method label clients build their half from (default ``algorithm.name``; ``"fcmoe/no-projection"``
        for a variant).
    max_norm_ratio
        ``robust.max_norm_ratio``: updates whose norm exceeds this multiple of the round's median are rejected.
    clip
        ``robust.clip``: accepted updates are clipped per unit to this multiple of the round's median (0 = off).
    """

    def __init__(self, algorithm: Algorithm, config_text: str, num_nodes: int, min_updates: int = 1,
                 node_wait_s: float = 600.0, method: str = "", max_norm_ratio: float = 10.0,
                 clip: float = 0.0) -> None:
        self.algorithm = algorithm
        self.max_norm_ratio = max_norm_ratio
        self.clip = clip
        self.method = method or algorithm.name
        self.node_wait_s = node_wait_s
        self._waited = False  # the initial wait for num_nodes happens once
        self.config_text = config_text
        self.num_nodes = num_nodes
        self.min_updates = min_updates
        self.global_tree: Tree = {}
        self.node_of_client: dict[int, int] = {}
        self.round_state = RoundState()

    # ------------------------------------------------------------------ train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.global_tree = record_to_tree(arrays)
        self.round_state = RoundState()  # the last round's updates are released here
        release_freed_memory()
        content = RecordDict({ARRAYS: arrays, CONFIG: self._config(server_round, config)})
        return [Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)
                for node in self._nodes(grid)]

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        state = self.round_state
        arrived, nodes = [], {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                state.rejected.append(f"node {node}: error reply ({reply.error.reason})")
                continue
            info = reply.content.get(UPDATE)
            if isinstance(info, MetricRecord) and info.get(ABSENT):
                continue  # not drawn this round
            try:
                update = decode_update(reply.content, self.algorithm.layout)
            except MalformedReply as err:
                state.rejected.append(f"node {node}: {err}")
                continue
            arrived.append(update)
            nodes[update.client_id] = node
        state.updates, problems = admit_updates(arrived, self.global_tree, self.algorithm.layout,
                                                self.max_norm_ratio, self.clip)
        state.rejected += problems
        self.node_of_client.update({u.client_id: nodes[u.client_id] for u in state.updates})
        for reason in state.rejected:
            log.warning("round %d: rejected %s", server_round, reason)
        state.updates.sort(key=lambda u: u.client_id)  # the in-process engine's order: same sums, same result
        if len(state.updates) < self.min_updates:
            log.warning("round %d: %d valid update(s) < %d: global model kept", server_round, len(state.updates),
                        self.min_updates)
            state.skipped = True
            return None, MetricRecord({"valid_updates": len(state.updates), "rejected": len(state.rejected)})
        state.result = self.algorithm.aggregate(self.global_tree, state.updates)
        arrays = tree_to_record(state.result.state)
        return arrays, MetricRecord({"valid_updates": len(state.updates), "rejected": len(state.rejected)})

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        messages = self.round_state.result.messages if self.round_state.result else {}
        client_of_node = {node: cid for cid, node in self.node_of_client.items()}
        out = []
        for node in self._nodes(grid):
            cid = client_of_node.get(node)
            trained = any(u.client_id == cid for u in self.round_state.updates)
            record = RecordDict({ARRAYS: arrays, CONFIG: self._config(server_round, config, trained=trained),
                                 MESSAGE: encode_message(messages.get(cid) if trained else None)})
            out.append(Message(content=record, dst_node_id=node, message_type=MessageType.EVALUATE))
        return out

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        for reply in replies:
            if reply.has_error() or not isinstance(reply.content.get(METRICS), MetricRecord):
                log.warning("round %d: evaluation reply from node %d unusable", server_round,
                            reply.metadata.src_node_id)
                continue
            metrics = reply.content[METRICS]
            self.round_state.local_acc[int(metrics["client_id"])] = float(metrics["local_acc"])
        accs = list(self.round_state.local_acc.values())
        return MetricRecord({"local_acc_mean": sum(accs) / len(accs)}) if accs else None

    def summary(self) -> None:
        log.info("fcmoe strategy: %s over %d nodes", self.method, self.num_nodes)

    # ------------------------------------------------------------------ helpers
    def _config(self, server_round: int, config: ConfigRecord, trained: bool = True) -> ConfigRecord:
        values: dict[str, Any] = dict(config)
        values.update({"server-round": server_round, "method": self.method,
                       "fcmoe-config": self.config_text, "trained": trained})
        return ConfigRecord(values)

    def _nodes(self, grid: Grid) -> list[int]:
        """The connected nodes, sorted. Before the first round, wait up to ``node_wait_s`` for ``num_nodes``.

        Flower's own strategies wait for ``min_available_nodes`` before every round, so one dead node stalls the
        run forever. Here only the start waits; later rounds go on with the nodes that are still connected (a node
        that died mid-round answers with an error reply, which ``aggregate_train`` rejects).
        """
        if not self._waited:
            deadline = time.monotonic() + self.node_wait_s
            while (connected := len(list(grid.get_node_ids()))) < self.num_nodes and time.monotonic() < deadline:
                log.info("waiting for nodes: %d of %d connected", connected, self.num_nodes)
                time.sleep(1.0)
            self._waited = True
        nodes = sorted(grid.get_node_ids())
        if not nodes:
            raise RuntimeError(f"no node connected within {self.node_wait_s:.0f} s; start the SuperNodes")
        if len(nodes) < self.num_nodes:
            log.warning("going on with %d of %d nodes", len(nodes), self.num_nodes)
        return nodes
