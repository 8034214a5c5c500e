"""Means over clients: the rule every algorithm combines updates with, and the FedAvg step on trees.

An algorithm never writes a weighted sum itself: it asks a :class:`MeanRule` for one, so a robust statistic
(:class:`~fcmoe.core.robust.CoordinateMean`) can replace the weighted mean without any branch inside the algorithm
(the robust wrapper, :mod:`fcmoe.algorithms.robust`, hands one in).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from fcmoe.core.tree import Tree, weighted_sum


class MeanRule(Protocol):
    """How updates are combined over clients."""

    def over_clients(self, values: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
        """N tensors of one shape and N weights summing to 1 → one tensor (at least float32)."""
        ...

    def per_expert(self, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``deltas [N, E, P]`` and ``weights [N, E]`` (columns summing to 1, or all zero) → ``[E, P]``."""
        ...

    def over_rows(self, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One expert unit: ``rows [N, P]`` (client i's update in row i) and ``weights [N]`` → ``[P]``."""
        ...


class WeightedMean:
    """Σ_i w_i x_i: the rule of every algorithm as published."""

    def over_clients(self, values: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
        # accumulated in client order, the order of Flower's aggregate_arrayrecords, so the two agree to rounding
        return weighted_sum(values, [torch.tensor(float(w), dtype=torch.float32) for w in weights])

    def per_expert(self, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return expert_weighted_mean(deltas, weights)

    def over_rows(self, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return expert_weighted_mean(rows[:, None, :], weights[:, None])[0]  # Σ_i w_i Δ_i


WEIGHTED_MEAN = WeightedMean()


def expert_weighted_mean(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_i w_{i,k} Δ_{i,k} for every expert k at once: one batched matrix product, one read of the deltas.

    Parameters
    ----------
    deltas
        ``[N, E, P]`` client updates per expert.
    weights
        ``[N, E]`` weights; a column of zeros yields a zero step (the expert keeps its value).

    Returns
    -------
    torch.Tensor
        ``[E, P]``, accumulated in at least float32.
    """
    if weights.shape != deltas.shape[:2]:
        raise ValueError(f"weights must be [N, E] = {tuple(deltas.shape[:2])}, got {tuple(weights.shape)}")
    acc = torch.promote_types(deltas.dtype, torch.float32)
    by_expert = deltas.transpose(0, 1).to(acc)  # [E, N, P]; a view for one expert's [N, 1, P] stack
    return torch.bmm(weights.to(acc).T.unsqueeze(1), by_expert).squeeze(1)  # [E, 1, N] @ [E, N, P] → [E, P]


def holder_weights(num_samples: torch.Tensor, holders: torch.Tensor) -> torch.Tensor:
    """FedMoE-Agg weights: n_i over the clients holding expert k (H_k), zero elsewhere.

    Parameters
    ----------
    num_samples
        ``[N]`` sample counts n_i.
    holders
        ``[N, E]`` bool, client i holds expert k.

    Returns
    -------
    torch.Tensor
        ``[N, E]`` weights n_i·[i ∈ H_k] / Σ_{j ∈ H_k} n_j; an all-zero column where |H_k| = 0 (keep the expert).
    """
    scores = num_samples.to(torch.float64)[:, None] * holders.to(torch.float64)  # [N, E]
    totals = scores.sum(dim=0, keepdim=True)
    return torch.where(totals > 0, scores / totals.clamp_min(1.0), 0.0).to(torch.float32)


def fedavg_step(global_state: Mapping[str, torch.Tensor], deltas: Sequence[Mapping[str, torch.Tensor]],
                num_samples: Sequence[float], keys: Sequence[str], mean: MeanRule = WEIGHTED_MEAN) -> Tree:
    """θ_key + Σ_i (n_i / Σ_j n_j) Δ_{i,key} for the given keys (FedAvg, Eq. 1 of McMahan et al.).

    ``mean`` replaces the weighted sum (a robust rule); the result keeps each tensor's dtype.
    """
    if not keys:
        return {}
    if len(deltas) != len(num_samples) or not deltas:
        raise ValueError(f"fedavg_step got {len(deltas)} updates and {len(num_samples)} sample counts")
    total = float(sum(num_samples))
    if not total > 0:
        raise ValueError(f"fedavg_step: sample counts sum to {total}; at least one must be positive")
    weights = [float(n) / total for n in num_samples]
    return {k: global_state[k] + mean.over_clients([d[k] for d in deltas], weights).to(global_state[k].dtype)
            for k in keys}
