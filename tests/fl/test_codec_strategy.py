"""The Flower records codec, and the generic strategy on hand-built replies (no Ray, no network)."""

from __future__ import annotations

import math
import time
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fcmoe import rounds
from fcmoe.algorithms import ALGORITHMS, ClientUpdate
from fcmoe.algorithms.robust import RobustAggregation, RobustConfig
from fcmoe.fl.codec import (
    ARRAYS,
    MESSAGE,
    Instruction,
    MalformedReply,
    RunSettings,
    decode_instruction,
    decode_message,
    decode_update,
    encode_evaluation,
    encode_identity,
    encode_message,
    encode_update,
    record_to_tree,
    tree_to_record,
)
from fcmoe.fl.strategy import AlgorithmStrategy
from fcmoe.models.build import BuiltModel
from fcmoe.rounds import RoundDraw
from tests.helpers import make_updates, random_delta


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Messages need a run and task id; Flower's runtimes set them, a unit test sets them by hand."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


class FakeGrid:
    """What the strategy asks of a Grid: the connected node ids, and each node's answer to who it is.

    ``nodes`` lists node ids; node ``nodes[i]`` is client i unless ``clients`` says otherwise.
    """

    def __init__(self, nodes: list[int], clients: dict[int, int] | None = None) -> None:
        self.nodes = nodes
        self.clients = clients if clients is not None else {node: i for i, node in enumerate(nodes)}
        self.queried: list[int] = []

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def send_and_receive(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
        self.queried += [m.metadata.dst_node_id for m in messages]
        return [Message(content=encode_identity(self.clients[m.metadata.dst_node_id]), reply_to=m) for m in messages]


def _reply(content: RecordDict | Error, to: Message) -> Message:
    """The reply of the node ``to`` was sent to (Flower sets the reply's source from the instruction)."""
    return Message(content, reply_to=to)


def test_tree_round_trip_keeps_values_and_dtypes_bfloat16_included() -> None:
    tree = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.arange(4)}
    back = record_to_tree(tree_to_record(tree))
    assert all(back[k].dtype == tree[k].dtype and torch.equal(back[k], tree[k]) for k in tree)


def test_a_bfloat16_global_model_reaches_the_client_as_bfloat16(tiny: BuiltModel) -> None:
    """The global arrays a strategy sends carry their dtype (no side record that Flower's loop would drop)."""
    global_state = {k: v.to(torch.bfloat16) for k, v in tiny.model.trainable_state().items()}
    strategy = _strategy(tiny, "fedavg", num_nodes=1)
    (instruction,) = strategy.configure_train(1, tree_to_record(global_state), ConfigRecord(), FakeGrid([3]))
    received = record_to_tree(instruction.content[ARRAYS])
    assert all(received[k].dtype == torch.bfloat16 and torch.equal(received[k], v) for k, v in global_state.items())
    assert all(v.dtype == torch.bfloat16 for v in strategy.global_tree.values())


def test_update_round_trip() -> None:
    update = ClientUpdate(3, {"w": torch.randn(2, 2)}, 17, {"layer": torch.tensor([4, 0, 9])}, {"loss": 0.25})
    back = decode_update(encode_update(update))
    assert (back.client_id, back.num_samples, back.metrics) == (3, 17, {"loss": 0.25})
    assert torch.equal(back.delta["w"], update.delta["w"]) and torch.equal(back.routing_counts["layer"],
                                                                            update.routing_counts["layer"])
    assert set(encode_update(update)) == {"delta", "routing", "update"}  # Δ_i, routing counts, n_i: nothing else


def test_sparse_update_travels_without_its_unrouted_experts(tiny: BuiltModel) -> None:
    from fcmoe.rounds import sparsify

    state = tiny.model.trainable_state()
    counts = [torch.tensor([0, 4, 0, 1]), torch.tensor([2, 2, 2, 2])]
    update = sparsify(make_updates(tiny, [random_delta(state, 0)], [9], counts[:1])[0], tiny.layout)
    dense_bytes = sum(v.numel() * v.element_size() for v in update.delta.values())
    content = encode_update(update, tiny.layout)
    assert sum(a.numel() * 4 for a in content["delta"].to_torch_state_dict().values()) == update.upload_bytes
    assert update.upload_bytes < dense_bytes
    back = decode_update(content, tiny.layout)
    assert back.sparse and back.upload_bytes == update.upload_bytes
    assert all(torch.equal(back.delta[k], update.delta[k]) for k in update.delta)  # absent experts: zeros
    with pytest.raises(MalformedReply, match="no expert layout"):
        decode_update(content)
    content["routing"] = ArrayRecord({k: torch.ones(4, dtype=torch.int64) for k in update.routing_counts})
    with pytest.raises(MalformedReply, match=r"sparse upload .*#part0: expected \[4, "):
        decode_update(content, tiny.layout)  # the counts claim more experts than were sent


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda c: c.pop("delta"), "no ArrayRecord 'delta'"),
    (lambda c: c.__setitem__("update", MetricRecord({"client_id": 1})), "lack 'num-examples'"),
    (lambda c: c.__setitem__("update", MetricRecord({"client_id": 1, "num-examples": 0})), "positive integer"),
])
def test_malformed_replies_are_named(mutate, match: str) -> None:  # noqa: ANN001
    content = encode_update(ClientUpdate(1, {"w": torch.zeros(2)}, 4, {"l": torch.tensor([1, 1])}))
    mutate(content)
    with pytest.raises(MalformedReply, match=match):
        decode_update(content)


def test_an_empty_message_decodes_to_none() -> None:
    assert decode_message(encode_message(None)) is None


def _updates(tiny: BuiltModel, n: int) -> list[ClientUpdate]:
    state = tiny.model.trainable_state()
    gen = torch.Generator().manual_seed(0)
    return [ClientUpdate(i, {k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in state.items()}, 10 + i,
                         {s.name: torch.randint(0, 20, (s.num_experts,), generator=gen) for s in tiny.layout.layers})
            for i in range(n)]


def _strategy(tiny: BuiltModel, method: str = "fcmoe", num_nodes: int = 2, draw: RoundDraw | None = None,
              robust: RobustConfig | None = None) -> AlgorithmStrategy:
    algo = ALGORITHMS.get(method)(ALGORITHMS.get(method).config_class(), tiny.layout)
    plan = draw or RoundDraw(list(range(num_nodes)), [])
    return AlgorithmStrategy(RobustAggregation(algo, robust or RobustConfig()), "rounds = 1\n", num_nodes,
                             lambda round_index: plan, method, node_wait_s=2.0)


def test_strategy_rejects_bad_replies_and_aggregates_the_rest(tiny: BuiltModel) -> None:
    strategy = _strategy(tiny, num_nodes=6)
    global_state = tiny.model.trainable_state()
    arrays = tree_to_record(global_state)
    grid = FakeGrid([11, 12, 13, 14, 15, 16])  # node 11 + i is client i
    instructions = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    assert [m.metadata.dst_node_id for m in instructions] == [11, 12, 13, 14, 15, 16]
    assert decode_instruction(instructions[0].content) == Instruction(1, "fcmoe", "rounds = 1\n")
    every = _updates(tiny, 6)
    good = [every[0], every[4]]
    poisoned = ClientUpdate(2, {k: v.clone() for k, v in every[2].delta.items()}, 10, every[2].routing_counts)
    first_key = next(iter(poisoned.delta))
    poisoned.delta[first_key][0] = math.nan
    missing = encode_update(every[3])
    missing.pop("routing")
    replies = [_reply(encode_update(every[4]), instructions[4]),  # replies arrive in any order
               _reply(Error(code=0, reason="client crashed"), instructions[1]),
               _reply(encode_update(poisoned), instructions[2]),
               _reply(missing, instructions[3]),
               _reply(encode_update(every[0]), instructions[5]),  # node 16 (client 5) sends client 0's update
               _reply(encode_update(every[0]), instructions[0])]
    new_arrays, metrics = strategy.aggregate_train(1, replies)
    expected = strategy.server.algorithm.aggregate(global_state, good).global_state
    got = record_to_tree(new_arrays)
    assert all(torch.equal(got[k], expected[k]) for k in expected)  # the same math, in client-id order
    assert metrics["valid_updates"] == 2 and metrics["rejected"] == 4
    reasons = " | ".join(strategy.round_state.step.rejected)
    assert "client crashed" in reasons and "non-finite" in reasons and "no ArrayRecord 'routing'" in reasons
    assert "node 16 is client 5 but sent an update of client 0" in reasons
    # each client's message goes back to the node of that client; every node is scored
    evaluate = {m.metadata.dst_node_id: m for m in strategy.configure_evaluate(1, new_arrays, ConfigRecord(), grid)}
    assert sorted(evaluate) == [11, 12, 13, 14, 15, 16]
    sent = decode_message(evaluate[11].content[MESSAGE])
    own = strategy.round_state.step.result.messages[0]
    assert sent is not None and all(torch.equal(sent[k], own[k]) for k in own)
    assert decode_instruction(evaluate[12].content).trained is False
    assert decode_message(evaluate[12].content[MESSAGE]) is None
    assert grid.queried == [11, 12, 13, 14, 15, 16]  # asked once, not again for the evaluation


def test_only_the_drawn_clients_that_do_not_fail_are_messaged(tiny: BuiltModel) -> None:
    """The server draws the participants: undrawn and failing clients get no train message (their nodes are
    still scored), and which node is which client comes from the nodes' own answers, in any order."""
    strategy = _strategy(tiny, "fedavg", num_nodes=4, draw=RoundDraw([0, 2, 3], [3]))
    grid = FakeGrid([40, 41, 42, 43], clients={40: 3, 41: 2, 42: 1, 43: 0})
    arrays = tree_to_record(tiny.model.trainable_state())
    sent = [m.metadata.dst_node_id for m in strategy.configure_train(1, arrays, ConfigRecord(), grid)]
    assert sent == [43, 41]  # clients 0 and 2, by client id
    assert len(list(strategy.configure_evaluate(1, arrays, ConfigRecord(), grid))) == 4


def test_strategy_rejects_a_scaled_update_by_its_norm(tiny: BuiltModel) -> None:
    strategy = _strategy(tiny, "fedavg", num_nodes=4)
    global_state = tiny.model.trainable_state()
    arrays = tree_to_record(global_state)
    instructions = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([1, 2, 3, 4])))
    updates = _updates(tiny, 4)
    attacker = ClientUpdate(3, {k: 100 * v for k, v in updates[0].delta.items()}, 10, updates[0].routing_counts)
    replies = [_reply(encode_update(u), m) for u, m in zip([*updates[:3], attacker], instructions, strict=True)]
    new_arrays, metrics = strategy.aggregate_train(1, replies)
    (reason,) = strategy.round_state.step.rejected
    assert reason.startswith("client 3: update norm") and "× the round's median" in reason
    expected = strategy.server.algorithm.aggregate(global_state, updates[:3]).global_state
    got = record_to_tree(new_arrays)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert metrics["valid_updates"] == 3 and metrics["rejected"] == 1


def test_a_new_round_drops_the_last_rounds_updates_before_releasing_freed_memory(
        tiny: BuiltModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The strategy opens each round with :func:`fcmoe.rounds.start_round` after dropping the last one's state."""
    algo = ALGORITHMS.get("fedavg")(ALGORITHMS.get("fedavg").config_class(), tiny.layout)
    participation = SimpleNamespace(fraction=1.0, dropout=0.0)
    exp = SimpleNamespace(config=SimpleNamespace(seed=0, participation=participation), num_clients=2)
    strategy = AlgorithmStrategy(RobustAggregation(algo, RobustConfig()), "", 2,
                                 lambda r: rounds.start_round(exp, r), "fedavg", node_wait_s=2.0)
    arrays = tree_to_record(tiny.model.trainable_state())
    instructions = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([1, 2])))
    replies = [_reply(encode_update(u), m) for u, m in zip(_updates(tiny, 2), instructions, strict=True)]
    strategy.aggregate_train(1, replies)
    held = [weakref.ref(u) for u in strategy.round_state.step.accepted]
    live_at_release: list[int] = []
    monkeypatch.setattr(rounds, "release_freed_memory",
                        lambda: live_at_release.append(sum(ref() is not None for ref in held)))
    strategy.configure_train(2, arrays, ConfigRecord(), FakeGrid([1, 2]))
    assert len(held) == 2 and live_at_release == [0]


def test_too_few_valid_updates_keep_the_global_model(tiny: BuiltModel) -> None:
    strategy = _strategy(tiny, "fedavg", num_nodes=1)
    arrays = tree_to_record(tiny.model.trainable_state())
    (instruction,) = strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([4]))
    bad = ClientUpdate(0, {"not.a.parameter": torch.zeros(1)}, 3, {})
    new_arrays, metrics = strategy.aggregate_train(1, [_reply(encode_update(bad), instruction)])
    assert new_arrays is None and strategy.round_state.step.skipped and metrics["rejected"] == 1
    assert "missing" in strategy.round_state.step.rejected[0]
    strict = _strategy(tiny, "fedavg", num_nodes=2, robust=RobustConfig(min_clients=3))
    instructions = list(strict.configure_train(1, arrays, ConfigRecord(), FakeGrid([1, 2])))
    new_arrays, _ = strict.aggregate_train(1, [_reply(encode_update(u), m)
                                                for u, m in zip(_updates(tiny, 2), instructions, strict=True)])
    assert new_arrays is None and strict.round_state.step.skipped  # robust.min_clients, as in-process


def test_a_missing_node_does_not_stall_the_round(tiny: BuiltModel) -> None:
    strategy = _strategy(tiny, num_nodes=3)
    arrays = tree_to_record(tiny.model.trainable_state())
    started = time.monotonic()
    sent = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([8, 9])))  # waits 2 s, goes on
    assert [m.metadata.dst_node_id for m in sent] == [8, 9] and time.monotonic() - started >= 2.0
    started = time.monotonic()
    later = list(strategy.configure_train(2, arrays, ConfigRecord(), FakeGrid([9], {9: 1})))  # node 8 died
    assert [m.metadata.dst_node_id for m in later] == [9] and time.monotonic() - started < 1.0
    with pytest.raises(RuntimeError, match="no node connected"):
        strategy.configure_train(3, arrays, ConfigRecord(), FakeGrid([]))


def test_local_accuracies_are_collected_by_client(tiny: BuiltModel) -> None:
    strategy = _strategy(tiny)
    arrays = tree_to_record(tiny.model.trainable_state())
    instructions = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([1, 2])))
    replies = [_reply(encode_evaluation(cid, acc, 4), msg)
               for cid, acc, msg in ((0, 0.5, instructions[0]), (1, 0.75, instructions[1]))]
    replies.append(_reply(Error(code=0, reason="gone"), instructions[1]))
    assert strategy.aggregate_evaluate(1, replies)["local_acc_mean"] == pytest.approx(0.625)
    assert strategy.round_state.local_acc == {0: 0.5, 1: 0.75}
    assert isinstance(arrays, ArrayRecord) and ARRAYS in instructions[0].content


def test_run_settings_round_trip_through_the_run_config_string() -> None:
    """What ``fcmoe deploy-local`` passes to ``flwr run --run-config`` is what the ServerApp reads back."""
    import tomllib

    settings = RunSettings("/a/b.toml", ("rounds=2", "seed=3"), "fcmoe/no-projection", "/out", 300.0, "/runs/r1")
    parsed = tomllib.loads("\n".join(settings.to_run_config().replace('" ', '"\n').splitlines()))
    assert RunSettings.from_run_config(parsed) == settings
    assert RunSettings.from_run_config({}) == RunSettings()


class SlowGrid:
    """Replies arrive over several pulls: ``arrivals[k]`` are the message ids answered at pull k."""

    def __init__(self, arrivals: list[list[str]]) -> None:
        self.arrivals, self.pulls = arrivals, 0

    def push_messages(self, messages: list[Message]) -> list[str]:
        return ["a", "b"]

    def pull_messages(self, ids: set[str]) -> list[SimpleNamespace]:
        answered = self.arrivals[self.pulls] if self.pulls < len(self.arrivals) else []
        self.pulls += 1
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in answered if i in ids]


def test_replies_are_collected_as_they_arrive_and_late_ones_are_left_out() -> None:
    from fcmoe.fl.strategy import REPLY_POLL_S, send_and_receive

    grid = SlowGrid([["a"], [], ["b"], ["a"]])
    replies = send_and_receive(grid, [], timeout=60.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a", "b"] and grid.pulls == 3
    started = time.monotonic()
    late = send_and_receive(SlowGrid([["b"]]), [], timeout=0.5)
    assert [r.metadata.reply_to_message_id for r in late] == ["b"]
    assert 0.5 <= time.monotonic() - started < 10 + REPLY_POLL_S  # the timeout, not a hang


def test_the_strategy_folds_streamed_replies_into_a_spilling_inbox_with_the_same_result(
        tiny: BuiltModel, tmp_path: Path) -> None:
    """``server.memory_budget = 0``: every decoded reply goes to disk as it arrives (the replies come as a stream),
    and the new global model and messages equal those of a strategy that holds them all."""
    global_state = tiny.model.trainable_state()
    arrays = tree_to_record(global_state)
    updates = _updates(tiny, 4)
    results = []
    for budget in (None, 0):
        strategy = _strategy(tiny, num_nodes=4)
        strategy.memory_budget, strategy.spill_dir = budget, tmp_path / "spill"
        instructions = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([1, 2, 3, 4])))
        stream = (_reply(encode_update(u), m) for u, m in zip(reversed(updates), reversed(instructions), strict=True))
        new_arrays, _ = strategy.aggregate_train(1, stream)
        results.append((record_to_tree(new_arrays), strategy.round_state.step.result.messages))
        assert not (tmp_path / "spill").exists()
    (kept, kept_messages), (spilled, spilled_messages) = results
    assert all(torch.equal(spilled[k], kept[k]) for k in kept)
    assert all(torch.equal(spilled_messages[c][k], v) for c, m in kept_messages.items() for k, v in m.items())
