from __future__ import annotations

import pytest
import torch

from fcmoe.core import IMPORTANCE_SCHEMES, importance_scores, importance_weights

N_SAMPLES = torch.tensor([10, 30])
FREQ = torch.tensor([[0.5, 0.5, 0.0], [0.9, 0.1, 0.0]])
NORMS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 1.0, 5.0]])


@pytest.mark.parametrize(("scheme", "expected"), [
    ("size", [[10, 10, 10], [30, 30, 30]]),
    ("freq", [[0.5, 0.5, 0.0], [0.9, 0.1, 0.0]]),
    ("norm", [[1, 2, 3], [4, 1, 5]]),
    ("freq_norm", [[0.5, 1.0, 0.0], [3.6, 0.1, 0.0]]),
    ("size_freq_norm", [[5, 10, 0], [108, 3, 0]]),
])
def test_scores_per_scheme(scheme: str, expected: list[list[float]]) -> None:
    scores = importance_scores(scheme, N_SAMPLES, FREQ, NORMS)
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("scheme", IMPORTANCE_SCHEMES)
def test_weights_sum_to_one_or_zero_per_expert(scheme: str) -> None:
    weights = importance_weights(scheme, N_SAMPLES, FREQ, NORMS)
    sums = weights.sum(dim=0)
    unused = FREQ.sum(dim=0) == 0
    if scheme in ("size", "norm"):
        torch.testing.assert_close(sums, torch.ones(3))
    else:
        torch.testing.assert_close(sums[~unused], torch.ones(int((~unused).sum())))
        assert (sums[unused] == 0).all()


def test_size_weights_are_fedavg_factors() -> None:
    weights = importance_weights("size", N_SAMPLES, FREQ, NORMS)
    torch.testing.assert_close(weights[:, 0], torch.tensor([0.25, 0.75]))


def test_unknown_scheme_is_named() -> None:
    with pytest.raises(ValueError, match="'bogus'"):
        importance_scores("bogus", N_SAMPLES, FREQ, NORMS)
