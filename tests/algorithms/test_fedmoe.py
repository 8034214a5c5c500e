"""FedMoE-Agg: experts averaged over the clients that activated them."""

from __future__ import annotations

import pytest
import torch

from fcmoe.algorithms.fedmoe import FedMoE, FedMoEConfig
from fcmoe.core import tree_add
from fcmoe.models.build import BuiltModel
from tests.algorithms.test_contract import make_updates, random_delta


def test_fedmoe_copies_a_single_holder_and_keeps_unheld(tiny: BuiltModel) -> None:
    state = tiny.model.trainable_state()
    d0, d1 = random_delta(state, 0), random_delta(state, 1)
    counts = [torch.tensor([4, 0, 0, 1]), torch.tensor([0, 0, 2, 1])]
    updates = make_updates(tiny, [d0, d1], [10, 30], counts)
    new = FedMoE(FedMoEConfig(), tiny.layout).aggregate(state, updates).state
    layer = tiny.layout.layers[1]
    expected = {0: tree_add(state, d0), 1: state, 2: tree_add(state, d1)}
    for k, ref in expected.items():
        for key in [part.keys[k] for part in layer.parts]:
            torch.testing.assert_close(new[key], ref[key])
    key3 = layer.parts[0].keys[3]
    torch.testing.assert_close(new[key3], state[key3] + 0.25 * d0[key3] + 0.75 * d1[key3])
    router = layer.router_keys[0]
    torch.testing.assert_close(new[router][1], state[router][1])  # nobody used expert 1: its row is kept
    torch.testing.assert_close(new[router][0], state[router][0] + d0[router][0])


def test_min_share_drops_a_marginal_holder(tiny: BuiltModel) -> None:
    state = tiny.model.trainable_state()
    d0, d1 = random_delta(state, 0), random_delta(state, 1)
    counts = [torch.tensor([99, 1, 0, 0]), torch.tensor([50, 50, 0, 0])]  # client 0 sent 1 % to expert 1
    updates = make_updates(tiny, [d0, d1], [10, 10], counts)
    key = tiny.layout.layers[0].parts[0].keys[1]
    loose = FedMoE(FedMoEConfig(), tiny.layout).aggregate(state, updates).state
    strict = FedMoE(FedMoEConfig(min_share=0.02), tiny.layout).aggregate(state, updates).state
    torch.testing.assert_close(loose[key], state[key] + 0.5 * d0[key] + 0.5 * d1[key])
    torch.testing.assert_close(strict[key], state[key] + d1[key])


def test_min_share_out_of_range_is_named() -> None:
    with pytest.raises(ValueError, match="fedmoe.min_share = 1.5"):
        FedMoEConfig(min_share=1.5)
