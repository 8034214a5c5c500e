"""Robust aggregation primitives against NumPy references and a large outlier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fcmoe.core import clip_factors, coordinate_aggregate


def test_clip_factors_bound_each_unit_by_a_multiple_of_its_median() -> None:
    norms = torch.tensor([[1.0, 0.0], [2.0, 4.0], [3.0, 400.0]])  # [N=3, U=2]; client 0 did not update unit 1
    factors = clip_factors(norms, 2.0)
    # unit 0: median 2 → limit 4, nobody clipped; unit 1: median over {4, 400} = 4 (lower) → limit 8
    expected = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 8.0 / 400.0]], dtype=torch.float64)
    torch.testing.assert_close(factors, expected)
    with pytest.raises(ValueError, match="must be > 0"):
        clip_factors(norms, 0.0)


@pytest.mark.parametrize("kind", ["median", "trimmed_mean"])
def test_coordinate_aggregate_matches_numpy_with_absent_clients(kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(3, 7, 5, generator=gen)  # [G, N, P]
    present = torch.rand(3, 7, generator=gen) > 0.3
    present[2] = False  # nobody in group 2
    got = coordinate_aggregate(values, kind, 0.2, present)
    for g in range(3):
        rows = values[g][present[g]].numpy()
        if rows.shape[0] == 0:
            expected = np.zeros(5)
        elif kind == "median":
            expected = np.sort(rows, axis=0)[(rows.shape[0] - 1) // 2]  # torch's lower median
        else:
            cut = int(np.floor(0.2 * rows.shape[0]))
            expected = np.sort(rows, axis=0)[cut:rows.shape[0] - cut].mean(axis=0)
        np.testing.assert_allclose(got[g].numpy(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["median", "trimmed_mean"])
def test_one_huge_client_barely_moves_the_robust_statistics(kind: str) -> None:
    honest = torch.ones(1, 9, 4) + 0.01 * torch.randn(1, 9, 4, generator=torch.Generator().manual_seed(1))
    attacked = torch.cat([honest, torch.full((1, 1, 4), 1e6)], dim=1)  # 1 of 10 sends 10^6
    assert coordinate_aggregate(attacked, kind, 0.1).sub(1).abs().max() < 0.05
    assert attacked.mean(dim=1).max() > 1e4  # what a plain mean does
