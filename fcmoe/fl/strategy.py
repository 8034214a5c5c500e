"""One generic Flower ``Strategy`` that runs fcmoe's round (:mod:`fcmoe.rounds`) over the nodes of a grid.

Per round (Flower's ``Strategy.start`` loop):
- ``configure_train``: keep the global arrays (Flower does not pass them to ``aggregate_train``), open the round
  with :func:`~fcmoe.rounds.start_round` and message only the nodes of the clients it draws that do not fail;
- ``aggregate_train``: decode the replies (an error reply or undecodable content is rejected with its reason) and
  hand them to :func:`~fcmoe.rounds.server_step`, the server half both engines share;
- ``configure_evaluate``: send the new global arrays to every node, with each aggregated client's own message
  (FC-MoE: one scalar per MoE layer and expert);
- ``aggregate_evaluate``: collect each client's local accuracy (its deployed model on its own test split).
Which node is which client is asked once per node (a query message answered with its partition id). The strategy
keeps what the ServerApp needs for the ``metrics.jsonl`` row in :attr:`round_state`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fcmoe.algorithms.robust import RobustAggregation
from fcmoe.core import Tree
from fcmoe.fl.codec import (
    Instruction,
    MalformedReply,
    decode_device,
    decode_evaluation,
    decode_identity,
    decode_update,
    deployed_global_of,
    encode_instruction,
    mean_local_accuracy,
    record_to_tree,
    round_counts,
    tree_to_record,
)
from fcmoe.fl.waiting import poll
from fcmoe.rounds import RoundDraw, ServerStep, server_step
from fcmoe.spill import UpdateInbox

log = logging.getLogger(__name__)

QUERY_TIMEOUT_S = 600.0  # a node that has not said which client it is by then is left out of the round
REPLY_POLL_S = 0.1  # how often a phase asks the SuperLink for replies (Flower's send_and_receive: every 3 s)


def receive(grid: Grid, messages: Iterable[Message], timeout: float) -> Iterator[Message]:
    """Flower's ``Grid.send_and_receive`` as a stream: each reply is yielded as it arrives (the caller folds it in
    and lets the message go), asking for replies every :data:`REPLY_POLL_S` instead of every 3 s (with a deployed
    message taking a few seconds, Flower's interval added ~1.5 s to each phase on average). Replies that have not
    come within ``timeout`` seconds are left out, as in Flower's."""
    waiting = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    while waiting:
        arrived = list(grid.pull_messages(waiting))
        waiting -= {reply.metadata.reply_to_message_id for reply in arrived}
        while arrived:
            yield arrived.pop(0)
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(REPLY_POLL_S)


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
    """Every reply of :func:`receive`, once they are all in (or the time is up)."""
    return list(receive(grid, messages, timeout))


@dataclass
class RoundState:
    """What one round produced, for the ServerApp's metrics row."""

    draw: RoundDraw = field(default_factory=lambda: RoundDraw([], []))
    step: ServerStep | None = None
    local_acc: dict[int, float] = field(default_factory=dict)  # client id → accuracy
    deployed_global: dict[int, float] = field(default_factory=dict)  # client id → deployed model on global test
    evaluation_started: float = 0.0  # perf_counter() when the round's evaluation phase began


class AlgorithmStrategy(Strategy):
    """Flower strategy driving an fcmoe algorithm behind its :class:`~fcmoe.algorithms.robust.RobustAggregation`.

    Parameters
    ----------
    server
        The algorithm's server half, behind screening, clipping and the configured mean.
    config_text
        The resolved experiment config as TOML, sent to clients.
    num_nodes
        Nodes to wait for before round 1.
    draw
        The round's participants (:func:`~fcmoe.rounds.start_round` of the experiment).
    method
        The method label clients build their half from (``"fcmoe/no-projection"`` for a variant).
    node_wait_s
        How long the first round waits for ``num_nodes`` nodes before going on with those connected.
    scored
        The clients whose deployed model a round scores, from the round and its draw (:func:`~fcmoe.rounds.
        scored_clients`; default: every client). A round's evaluate phase reaches these and the drawn clients
        (which apply the server's message); the others' state stands unchanged, so they are not asked.
    state_key
        The run's key for node-local client state (:mod:`fcmoe.fl.node_state`), sent with every instruction.
    memory_budget, spill_dir
        ``server.memory_budget`` in bytes, and where the replies beyond it wait (:class:`~fcmoe.spill.UpdateInbox`).
    """

    def __init__(self, server: RobustAggregation, config_text: str, num_nodes: int,
                 draw: Callable[[int], RoundDraw], method: str, node_wait_s: float = 600.0,
                 scored: Callable[[int, RoundDraw], Collection[int]] | None = None, state_key: str = "",
                 memory_budget: int | None = None, spill_dir: Path | None = None) -> None:
        self.server = server
        self.config_text = config_text
        self.num_nodes = num_nodes
        self.draw = draw
        self.scored = scored or (lambda round_index, draw: range(num_nodes))
        self.memory_budget, self.spill_dir = memory_budget, spill_dir
        self.method = method
        self.state_key = state_key
        self.node_wait_s = node_wait_s
        self._waited = False  # the initial wait for num_nodes happens once
        self.client_devices: set[str] = set()  # where the accepted replies say their clients trained
        self.global_tree: Tree = {}
        self.client_of_node: dict[int, int] = {}
        self.round_state = RoundState()

    def run_rounds(self, grid: Grid, arrays: ArrayRecord, first_round: int, num_rounds: int, timeout: float,
                   evaluate_fn: Callable[[int, ArrayRecord], object]) -> ArrayRecord:
        """Rounds ``first_round`` … ``num_rounds`` (Flower's ``Strategy.start`` loop, which always starts at round 1:
        a resumed run continues from its checkpoint); ``evaluate_fn(round, arrays)`` ends each round. Returns the
        final global arrays."""
        for server_round in range(first_round, num_rounds + 1):
            log.info("[ROUND %d/%d]", server_round, num_rounds)
            replies = receive(grid, self.configure_train(server_round, arrays, ConfigRecord(), grid), timeout)
            new_arrays, _ = self.aggregate_train(server_round, replies)  # each reply folded in as it arrives
            arrays = arrays if new_arrays is None else new_arrays
            replies = send_and_receive(grid, self.configure_evaluate(server_round, arrays, ConfigRecord(), grid),
                                       timeout)
            self.aggregate_evaluate(server_round, replies)
            evaluate_fn(server_round, arrays)
        return arrays

    # ------------------------------------------------------------------ train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.round_state = RoundState()  # the last round's updates are released here, before start_round
        self.global_tree = record_to_tree(arrays)
        self.round_state.draw = self.draw(server_round)
        training = set(self.round_state.draw.training)
        instruction = Instruction(server_round, self.method, self.config_text, state_key=self.state_key)
        return [Message(content=encode_instruction(arrays, instruction), dst_node_id=node,
                        message_type=MessageType.TRAIN)
                for node, cid in self._clients(grid).items() if cid in training]

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rejected: list[str] = []
        with UpdateInbox(self.memory_budget, self.spill_dir) as inbox:  # beyond server.memory_budget: on disk
            for reply in replies:
                node = reply.metadata.src_node_id
                if reply.has_error():
                    rejected.append(f"node {node}: error reply ({reply.error.reason})")
                    continue
                try:
                    update = decode_update(reply.content, self.server.algorithm.layout)
                except MalformedReply as err:
                    rejected.append(f"node {node}: {err}")
                    continue
                if update.client_id != self.client_of_node.get(node):  # a node answers for its own client only
                    rejected.append(f"node {node} is client {self.client_of_node.get(node)} but sent an update "
                                    f"of client {update.client_id}")
                    continue
                self.client_devices.add(decode_device(reply.content) or "not recorded")
                inbox.add(update)
            step = server_step(self.server, self.global_tree, inbox.updates, rejected, label=f"round {server_round}")
        self.round_state.step = step
        counts = round_counts(len(step.accepted), len(step.rejected))
        return (None if step.skipped else tree_to_record(step.result.global_state)), counts

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        step = self.round_state.step
        messages = step.result.messages if step else {}
        aggregated = {u.client_id for u in step.accepted} if step else set()
        self.round_state.evaluation_started = time.perf_counter()
        scored = set(self.scored(server_round, self.round_state.draw))
        asked = scored | set(self.round_state.draw.drawn)
        out = []
        for node, cid in self._clients(grid).items():
            if cid not in asked:
                continue
            instruction = Instruction(server_round, self.method, self.config_text, cid in aggregated, cid in scored,
                                      self.state_key)
            out.append(Message(content=encode_instruction(arrays, instruction, messages.get(cid), evaluate=True),
                               dst_node_id=node, message_type=MessageType.EVALUATE))
        return out

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        for reply in replies:
            try:
                if reply.has_error():
                    raise MalformedReply(f"error reply ({reply.error.reason})")
                cid, acc = decode_evaluation(reply.content)
            except MalformedReply as err:
                log.warning("round %d: evaluation reply from node %d unusable: %s", server_round,
                            reply.metadata.src_node_id, err)
                continue
            if not math.isnan(acc):  # NaN: not scored this round (eval.every)
                self.round_state.local_acc[cid] = acc
            deployed = deployed_global_of(reply.content)
            if deployed is not None:
                self.round_state.deployed_global[cid] = deployed
        return mean_local_accuracy(list(self.round_state.local_acc.values()))

    def summary(self) -> None:
        log.info("fcmoe strategy: %s over %d nodes", self.method, self.num_nodes)

    # ------------------------------------------------------------------ nodes
    def _clients(self, grid: Grid) -> dict[int, int]:
        """Node id → client id for every connected node that said which client it is, sorted by client id.

        Before the first round, wait up to ``node_wait_s`` for ``num_nodes`` nodes. Flower's own strategies wait
        for ``min_available_nodes`` before every round, so one dead node stalls the run forever; here only the
        start waits, and later rounds go on with the nodes still connected (a node that died mid-round answers
        with an error reply, which ``aggregate_train`` rejects). A node not seen before is asked once who it is.
        """
        if not self._waited:
            def connected() -> int:
                count = len(list(grid.get_node_ids()))
                if count < self.num_nodes:
                    log.info("waiting for nodes: %d of %d connected", count, self.num_nodes)
                return count

            poll(connected, lambda count: count >= self.num_nodes, self.node_wait_s, 1.0)
            self._waited = True
        nodes = sorted(grid.get_node_ids())
        if not nodes:
            raise RuntimeError(f"no node connected within {self.node_wait_s:.0f} s; start the SuperNodes")
        if len(nodes) < self.num_nodes:
            log.warning("going on with %d of %d nodes", len(nodes), self.num_nodes)
        unknown = [node for node in nodes if node not in self.client_of_node]
        if unknown:
            queries = [Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.QUERY)
                       for node in unknown]
            for reply in grid.send_and_receive(queries, timeout=QUERY_TIMEOUT_S):
                try:
                    if reply.has_error():
                        raise MalformedReply(f"error reply ({reply.error.reason})")
                    self.client_of_node[reply.metadata.src_node_id] = decode_identity(reply.content)
                except MalformedReply as err:
                    log.warning("node %d did not say which client it is: %s", reply.metadata.src_node_id, err)
        known = {node: self.client_of_node[node] for node in nodes if node in self.client_of_node}
        return dict(sorted(known.items(), key=lambda item: item[1]))
