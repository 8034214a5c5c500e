"""Our FedAvg equals Flower's own ``aggregate_arrayrecords`` on the same state dicts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fcmoe.core import fedavg_step, tree_add, tree_norm, tree_sub


def random_tree(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(5, 3, generator=gen), "b.bias": torch.randn(7, generator=gen),
            "experts.expert_0.wi.weight": torch.randn(4, 4, generator=gen)}


def test_fedavg_step_matches_flower_fedavg() -> None:
    trees = [random_tree(s) for s in range(4)]
    sizes = [13, 40, 7, 101]
    records = [RecordDict({"arrays": ArrayRecord(dict(t)),
                           "metrics": MetricRecord({"num-examples": n})}) for t, n in zip(trees, sizes, strict=True)]
    flower = aggregate_arrayrecords(records, "num-examples").to_numpy_ndarrays()
    zero = {k: torch.zeros_like(v) for k, v in trees[0].items()}
    ours = fedavg_step(zero, trees, sizes, list(zero))
    for key, expected in zip(trees[0], flower, strict=True):
        np.testing.assert_allclose(ours[key].numpy(), expected, rtol=1e-6, atol=1e-7)


def test_tree_ops_do_not_mutate() -> None:
    a, b = random_tree(0), random_tree(1)
    a0, b0 = {k: v.clone() for k, v in a.items()}, {k: v.clone() for k, v in b.items()}
    diff = tree_sub(a, b)
    back = tree_add(b, diff)
    for key in a:
        torch.testing.assert_close(back[key], a[key])
        assert torch.equal(a[key], a0[key]) and torch.equal(b[key], b0[key])


def test_fedavg_step_rejects_zero_weights() -> None:
    with pytest.raises(ValueError, match="sum to 0"):
        fedavg_step(random_tree(1), [random_tree(0)], [0], ["b.bias"])


def test_tree_norm_is_the_float64_norm_of_every_value() -> None:
    gen = torch.Generator().manual_seed(0)
    tree = {"a": torch.randn(3, 40_000, generator=gen), "b": torch.randn(5, generator=gen).to(torch.bfloat16),
            "c": torch.tensor(2.0), "d": torch.zeros(0, 4)}
    expected = torch.sqrt(sum((v.double() ** 2).sum() for v in tree.values()))
    got = tree_norm(tree)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0.0)  # float32 pieces, float64 sums
