"""FedMoE-Agg (``fedmoe/agg``): experts averaged over the clients that activated them; robustness wrappers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fcmoe.algorithms.fedmoe import FedMoE, FedMoEConfig
from fcmoe.core import tree_add
from fcmoe.models.build import BuiltModel
from tests.helpers import make_updates, random_delta

AGG = FedMoEConfig(sub_models=False, recommend=False)  # the variant fedmoe/agg


def test_fedmoe_copies_a_single_holder_and_keeps_unheld(tiny: BuiltModel) -> None:
    state = tiny.model.trainable_state()
    d0, d1 = random_delta(state, 0), random_delta(state, 1)
    counts = [torch.tensor([4, 0, 0, 1]), torch.tensor([0, 0, 2, 1])]
    updates = make_updates(tiny, [d0, d1], [10, 30], counts)
    new = FedMoE(AGG, tiny.layout).aggregate(state, updates).global_state
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
    loose = FedMoE(AGG, tiny.layout).aggregate(state, updates).global_state
    strict = FedMoE(FedMoEConfig(sub_models=False, min_share=0.02), tiny.layout).aggregate(state, updates).global_state
    torch.testing.assert_close(loose[key], state[key] + 0.5 * d0[key] + 0.5 * d1[key])
    torch.testing.assert_close(strict[key], state[key] + d1[key])


def test_min_share_out_of_range_is_named() -> None:
    with pytest.raises(ValueError, match="fedmoe.min_share = 1.5"):
        FedMoEConfig(min_share=1.5)


def test_sparse_uploads_make_an_unsent_expert_absent_not_zero(tiny: BuiltModel) -> None:
    """Client 1 routed nothing to expert 3 and did not send it: FedAvg and FC-MoE use client 0's alone."""
    from fcmoe.algorithms.fcmoe import FCMoE, FCMoEConfig
    from fcmoe.algorithms.fedavg import FedAvg, FedAvgConfig
    from fcmoe.rounds import sparsify

    state = tiny.model.trainable_state()
    counts = [torch.tensor([3, 1, 1, 9]), torch.tensor([4, 2, 5, 0])]
    layer = tiny.layout.layers[0]
    key3 = next(k for k in layer.keys if "expert_3." in k)
    deltas = [random_delta(state, s) for s in range(2)]
    deltas[1][key3] = torch.zeros_like(state[key3])  # no token reached it, so training left it unchanged
    dense = make_updates(tiny, deltas, [10, 30], counts)
    sparse = [sparsify(u, tiny.layout) for u in dense]
    assert torch.equal(sparse[1].delta[key3], torch.zeros_like(state[key3]))
    assert sparse[1].upload_bytes < sum(v.numel() * 4 for v in dense[1].delta.values())
    for algo in (FedAvg(FedAvgConfig(), tiny.layout), FCMoE(FCMoEConfig(importance="size", tau=-1.0), tiny.layout)):
        was_zero = algo.aggregate(state, dense).global_state
        absent = algo.aggregate(state, sparse).global_state
        torch.testing.assert_close(absent[key3], state[key3] + dense[0].delta[key3])  # client 0's alone
        torch.testing.assert_close(was_zero[key3], state[key3] + 0.25 * dense[0].delta[key3])  # 10/40 of it
        key0 = next(k for k in layer.keys if "expert_0." in k)  # both sent expert 0: unchanged semantics
        torch.testing.assert_close(absent[key0], was_zero[key0])


@pytest.mark.parametrize("aggregator", ["median", "trimmed_mean"])
def test_robust_inner_aggregator_resists_a_sign_flipped_and_scaled_client(tiny: BuiltModel, aggregator: str) -> None:
    """9 honest clients near +d, one sends −1000·d: the mean flips sign, the robust aggregators do not."""
    from fcmoe.algorithms.fcmoe import FCMoE, FCMoEConfig
    from fcmoe.algorithms.fedavg import FedAvg, FedAvgConfig
    from fcmoe.algorithms.robust import RobustAggregation, RobustConfig

    state = tiny.model.trainable_state()
    base = random_delta(state, 0)
    deltas = [{k: v * (1 + 0.01 * i) for k, v in base.items()} for i in range(9)]
    deltas.append({k: -1000 * v for k, v in base.items()})
    counts = [torch.tensor([5, 5, 5, 5])] * 10
    updates = make_updates(tiny, deltas, [10] * 10, counts)
    robust = RobustConfig(aggregator=aggregator, max_norm_ratio=0.0)
    for cls, config in ((FedAvg, FedAvgConfig()), (FCMoE, FCMoEConfig()), (FedMoE, AGG), (FedMoE, FedMoEConfig())):
        algo = cls(config, tiny.layout)  # a fresh server each time: FedMoE's first round assigns sub-MoEs
        mean_step = tree_add(algo.aggregate(state, updates).global_state, state, scale=-1.0)
        wrapped = RobustAggregation(cls(config, tiny.layout), robust)
        robust_step = tree_add(wrapped.aggregate(state, updates).global_state, state, scale=-1.0)
        for key in (tiny.layout.layers[0].keys[0], tiny.layout.shared_keys[0], *tiny.layout.router_keys[:1]):
            assert (mean_step[key] * base[key]).sum() < 0, key  # the attacker wins the mean
            cosine = torch.nn.functional.cosine_similarity(robust_step[key].flatten(), base[key].flatten(), dim=0)
            assert cosine > 0.99, (algo.name, aggregator, key)  # the robust step points where the honest clients do


def test_the_wrapper_with_the_mean_is_the_algorithm_itself(tiny: BuiltModel) -> None:
    """RobustAggregation adds nothing when it screens nothing and keeps the weighted mean."""
    from fcmoe.algorithms import ALGORITHMS
    from fcmoe.algorithms.robust import RobustAggregation, RobustConfig

    state = tiny.model.trainable_state()
    everything = make_updates(tiny, [random_delta(state, s) for s in range(3)], [5, 9, 2],
                              [torch.tensor([5, 0, 2, 1]), torch.tensor([1, 1, 7, 0]), torch.tensor([3, 3, 3, 3])])
    for name in ALGORITHMS.names():
        cls = ALGORITHMS.get(name)
        algo = cls(cls.config_class(), tiny.layout)
        updates = [dataclasses.replace(u, delta={k: u.delta[k] for k in algo.upload_keys(state)}) for u in everything]
        plain = algo.aggregate(state, updates)
        server = RobustAggregation(cls(cls.config_class(), tiny.layout), RobustConfig())
        accepted, rejected = server.admit(updates, state)
        wrapped = server.aggregate(state, accepted)
        assert rejected == [] and all(torch.equal(plain.global_state[k], wrapped.global_state[k]) for k in state), name


def test_clipping_bounds_a_scaled_client_per_unit(tiny: BuiltModel) -> None:
    from fcmoe.algorithms.robust import clip_updates
    from fcmoe.core import tree_norm

    state = tiny.model.trainable_state()
    deltas = [random_delta(state, s) for s in range(4)]
    deltas[3] = {k: 100 * v for k, v in deltas[3].items()}
    updates = make_updates(tiny, deltas, [10] * 4, [torch.tensor([5, 5, 5, 5])] * 4)
    clipped = clip_updates(updates, tiny.layout, 2.0)
    assert tree_norm(clipped[3].delta) < 3 * max(tree_norm(u.delta) for u in updates[:3])
    for before, after in zip(updates[:3], clipped[:3], strict=True):
        assert all(torch.equal(before.delta[k], after.delta[k]) for k in before.delta)  # within 2× the median
    assert all(torch.equal(updates[3].delta[k], deltas[3][k]) for k in deltas[3])  # inputs not modified
