"""FedAdam against Flower's own ``FedAdam`` strategy on the same replies, and its moments across a resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam as FlowerFedAdam
from flwr.supercore.task_identity import TaskIdentity

from fcmoe.algorithms.fedadam import FedAdam, FedAdamConfig
from fcmoe.models.build import BuiltModel
from tests.helpers import TINY, make_updates, random_delta, stop_after_round_two_and_resume


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _flower_round(strategy: FlowerFedAdam, server_round: int, global_state: dict[str, torch.Tensor],
                  deltas: list[dict[str, torch.Tensor]], sizes: list[int]) -> dict[str, np.ndarray]:
    """One round of Flower's FedAdam: the replies carry each client's model θ + Δ_i and its n_i."""
    strategy.current_arrays = {k: v.numpy() for k, v in global_state.items()}  # what configure_train stores
    replies = []
    for node, (delta, n) in enumerate(zip(deltas, sizes, strict=True), start=1):
        sent = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
        model = ArrayRecord({k: global_state[k] + delta[k] for k in global_state})
        replies.append(Message(RecordDict({"arrays": model, "metrics": MetricRecord({"num-examples": n})}),
                               reply_to=sent))
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return {k: a.numpy() for k, a in arrays.items()}


def test_two_rounds_equal_flowers_fedadam(tiny: BuiltModel) -> None:
    """Same replies, same hyper-parameters, two rounds (the moments carried): the same models as Flower's."""
    config = FedAdamConfig(eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-3)
    ours = FedAdam(config, tiny.layout)
    flower = FlowerFedAdam(eta=config.eta, beta_1=config.beta_1, beta_2=config.beta_2, tau=config.tau)
    state = tiny.model.trainable_state()
    flower_state = {k: v.clone() for k, v in state.items()}
    sizes = [7, 19, 3]
    for server_round in (1, 2):
        deltas = [random_delta(state, 10 * server_round + i) for i in range(3)]
        state = ours.aggregate(state, make_updates(tiny, deltas, sizes)).global_state
        expected = _flower_round(flower, server_round, flower_state, deltas, sizes)
        flower_state = {k: torch.from_numpy(expected[k]).float() for k in state}
        for key in state:
            np.testing.assert_allclose(state[key].numpy(), expected[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert ours.steps == 2 and set(ours.first_moment) == set(state)
    moved = ours.aggregate(state, make_updates(tiny, [random_delta(state, 99)] * 3, sizes)).global_state
    assert any(not torch.equal(moved[k], state[k]) for k in state)


def test_the_moments_survive_a_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped after round 2 and resumed from its checkpoint ends bit-identical to an uninterrupted one:
    the moments and the step count come back with the model (without them the resumed run differs)."""
    from fcmoe.config import load_config
    from fcmoe.experiment import prepare_experiment
    from fcmoe.sim import engine

    exp = prepare_experiment(load_config(overrides=[*TINY, "methods=['fedadam']", "rounds=3", "fedadam.eta=0.01"]))
    _, uninterrupted = engine.run_method(exp, "fedadam", tmp_path / "a.jsonl")
    resumed = stop_after_round_two_and_resume(exp, "fedadam", tmp_path, monkeypatch)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    monkeypatch.setattr(FedAdam, "load_server_state", lambda self, state: None)  # forget the moments
    _, forgetful = engine.run_method(exp, "fedadam", tmp_path / "c.jsonl", checkpoint_dir=tmp_path / "after-round-2")
    assert any(not torch.equal(forgetful[k], uninterrupted[k]) for k in uninterrupted)
