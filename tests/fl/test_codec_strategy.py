"""The Flower records codec, and the generic strategy on hand-built replies (no Ray, no network)."""

from __future__ import annotations

import math
import time
import weakref

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fcmoe.algorithms import ALGORITHMS, ClientUpdate
from fcmoe.fl.codec import (MalformedReply, decode_message, decode_update, encode_message, encode_update,
                            load_client_state, record_to_tree, save_client_state, tree_to_record)
from fcmoe.fl import strategy as strategy_module
from fcmoe.fl.strategy import ARRAYS, CONFIG, MESSAGE, METRICS, AlgorithmStrategy
from fcmoe.models.build import BuiltModel


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Messages need a run and task id; Flower's runtimes set them, a unit test sets them by hand."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


class FakeGrid:
    """What the strategy asks of a Grid: the connected node ids."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


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
    assert back.expert_norms == {}  # none sent, none invented
    update.expert_norms = {"layer": torch.tensor([0.5, 0.0, 2.25])}
    assert torch.equal(decode_update(encode_update(update)).expert_norms["layer"], update.expert_norms["layer"])


def test_sparse_update_travels_without_its_unrouted_experts(tiny: BuiltModel) -> None:
    from fcmoe.rounds import sparsify
    from tests.algorithms.test_contract import make_updates, random_delta

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


def test_client_state_round_trip_and_dropped_keys_disappear() -> None:
    records = RecordDict()
    save_client_state({"seed": 5, "residual": {"x": torch.ones(2)}}, records)
    state = load_client_state(records)
    assert state["seed"] == 5 and torch.equal(state["residual"]["x"], torch.ones(2))
    save_client_state({"seed": 5}, records)
    assert load_client_state(records) == {"seed": 5}
    assert decode_message(encode_message(None)) is None


def _updates(tiny: BuiltModel, n: int) -> list[ClientUpdate]:
    state = tiny.model.trainable_state()
    gen = torch.Generator().manual_seed(0)
    return [ClientUpdate(i, {k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in state.items()}, 10 + i,
                         {s.name: torch.randint(0, 20, (s.num_experts,), generator=gen) for s in tiny.layout.layers})
            for i in range(n)]


def _strategy(tiny: BuiltModel, method: str = "fcmoe", num_nodes: int = 2) -> AlgorithmStrategy:
    algo = ALGORITHMS.get(method)(ALGORITHMS.get(method).config_class(), tiny.layout)
    return AlgorithmStrategy(algo, "rounds = 1\n", num_nodes=num_nodes, node_wait_s=2.0)


def test_strategy_rejects_bad_replies_and_aggregates_the_rest(tiny: BuiltModel) -> None:
    strategy = _strategy(tiny)
    global_state = tiny.model.trainable_state()
    arrays = tree_to_record(global_state)
    instructions = list(strategy.configure_train(1, arrays, ConfigRecord(),
                                                 FakeGrid([11, 12, 13, 14, 15])))
    assert [m.metadata.dst_node_id for m in instructions] == [11, 12, 13, 14, 15]
    assert instructions[0].content[CONFIG]["method"] == "fcmoe"
    good = _updates(tiny, 2)
    poisoned = ClientUpdate(2, {k: v.clone() for k, v in good[0].delta.items()}, 10, good[0].routing_counts)
    first_key = next(iter(poisoned.delta))
    poisoned.delta[first_key][0] = math.nan
    missing = encode_update(good[0])
    missing.pop("routing")
    replies = [Message(content=encode_update(good[1]), reply_to=instructions[0]),
               Message(Error(code=0, reason="client crashed"), reply_to=instructions[1]),
               Message(content=encode_update(poisoned), reply_to=instructions[2]),
               Message(content=missing, reply_to=instructions[3]),
               Message(content=encode_update(good[0]), reply_to=instructions[4])]
    new_arrays, metrics = strategy.aggregate_train(1, replies)
    expected = strategy.algorithm.aggregate(global_state, good).state
    got = record_to_tree(new_arrays)
    assert all(torch.equal(got[k], expected[k]) for k in expected)  # the same math, in client-id order
    assert metrics["valid_updates"] == 2 and metrics["rejected"] == 3
    reasons = " | ".join(strategy.round_state.rejected)
    assert "client crashed" in reasons and "non-finite" in reasons and "no ArrayRecord 'routing'" in reasons
    # each client's message goes back to the node that trained it
    evaluate = {m.metadata.dst_node_id: m for m in strategy.configure_evaluate(1, new_arrays,
                                                                              ConfigRecord(),
                                                                              FakeGrid([11, 12, 13, 14, 15]))}
    sent = decode_message(evaluate[15].content[MESSAGE])
    own = strategy.round_state.result.messages[0]
    assert sent is not None and all(torch.equal(sent[k], own[k]) for k in own)
    assert evaluate[12].content[CONFIG]["trained"] is False and decode_message(evaluate[12].content[MESSAGE]) is None


def test_strategy_rejects_a_scaled_update_by_its_norm_and_skips_absent_clients(tiny: BuiltModel) -> None:
    strategy = _strategy(tiny, "fedavg", num_nodes=5)
    global_state = tiny.model.trainable_state()
    arrays = tree_to_record(global_state)
    instructions = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([1, 2, 3, 4, 5])))
    updates = _updates(tiny, 4)
    attacker = ClientUpdate(4, {k: 100 * v for k, v in updates[0].delta.items()}, 10, updates[0].routing_counts)
    absent = RecordDict({"update": MetricRecord({"client_id": 5, "absent": 1})})
    replies = [Message(content=encode_update(u), reply_to=m) for u, m in zip([*updates[1:], attacker], instructions)]
    replies.append(Message(content=absent, reply_to=instructions[4]))
    new_arrays, metrics = strategy.aggregate_train(1, replies)
    (reason,) = strategy.round_state.rejected
    assert reason.startswith("client 4: update norm") and "× the round's median" in reason
    expected = strategy.algorithm.aggregate(global_state, updates[1:]).state
    got = record_to_tree(new_arrays)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert metrics["valid_updates"] == 3 and metrics["rejected"] == 1  # the absent client is neither


def test_a_new_round_drops_the_last_rounds_updates_before_releasing_freed_memory(
        tiny: BuiltModel, monkeypatch: pytest.MonkeyPatch) -> None:
    strategy = _strategy(tiny, "fedavg", num_nodes=2)
    arrays = tree_to_record(tiny.model.trainable_state())
    instructions = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([1, 2])))
    strategy.aggregate_train(1, [Message(content=encode_update(u), reply_to=m)
                                 for u, m in zip(_updates(tiny, 2), instructions)])
    held = [weakref.ref(u) for u in strategy.round_state.updates]
    live_at_release: list[int] = []
    monkeypatch.setattr(strategy_module, "release_freed_memory",
                        lambda: live_at_release.append(sum(ref() is not None for ref in held)))
    strategy.configure_train(2, arrays, ConfigRecord(), FakeGrid([1, 2]))
    assert len(held) == 2 and live_at_release == [0]


def test_no_valid_update_keeps_the_global_model(tiny: BuiltModel) -> None:
    strategy = _strategy(tiny, "fedavg", num_nodes=1)
    arrays = tree_to_record(tiny.model.trainable_state())
    (instruction,) = strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([4]))
    bad = ClientUpdate(0, {"not.a.parameter": torch.zeros(1)}, 3, {})
    new_arrays, metrics = strategy.aggregate_train(1, [Message(content=encode_update(bad), reply_to=instruction)])
    assert new_arrays is None and strategy.round_state.skipped and metrics["rejected"] == 1
    assert "missing" in strategy.round_state.rejected[0]


def test_a_missing_node_does_not_stall_the_round(tiny: BuiltModel) -> None:
    strategy = _strategy(tiny, num_nodes=3)
    arrays = tree_to_record(tiny.model.trainable_state())
    started = time.monotonic()
    sent = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([8, 9])))  # waits 2 s, goes on
    assert [m.metadata.dst_node_id for m in sent] == [8, 9] and time.monotonic() - started >= 2.0
    started = time.monotonic()
    later = list(strategy.configure_train(2, arrays, ConfigRecord(), FakeGrid([9])))  # node 8 died: no wait
    assert [m.metadata.dst_node_id for m in later] == [9] and time.monotonic() - started < 1.0
    with pytest.raises(RuntimeError, match="no node connected"):
        strategy.configure_train(3, arrays, ConfigRecord(), FakeGrid([]))


def test_local_accuracies_are_collected_by_client(tiny: BuiltModel) -> None:
    strategy = _strategy(tiny)
    arrays = tree_to_record(tiny.model.trainable_state())
    instructions = list(strategy.configure_train(1, arrays, ConfigRecord(),
                                                 FakeGrid([1, 2])))
    replies = [Message(content=RecordDict({METRICS: MetricRecord({"client_id": cid, "local_acc": acc,
                                                                   "num-examples": 4})}), reply_to=msg)
               for cid, acc, msg in ((0, 0.5, instructions[0]), (1, 0.75, instructions[1]))]
    replies.append(Message(Error(code=0, reason="gone"), reply_to=instructions[1]))
    assert strategy.aggregate_evaluate(1, replies)["local_acc_mean"] == pytest.approx(0.625)
    assert strategy.round_state.local_acc == {0: 0.5, 1: 0.75}
    assert isinstance(arrays, ArrayRecord) and ARRAYS in instructions[0].content
