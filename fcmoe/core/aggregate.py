"""Per-expert weighted means and the FedAvg step on trees of updates."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fcmoe.core.tree import Tree, weighted_mean


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
    by_expert = deltas.transpose(0, 1).to(acc)  # [E, N, P]; no copy for ExpertLayout.gather_experts_batched output
    return torch.bmm(weights.to(acc).T.unsqueeze(1), by_expert).squeeze(1)  # [E, 1, N] @ [E, N, P] → [E, P]


def holder_weights(num_samples: torch.Tensor, holders: torch.Tensor) -> torch.Tensor:
    """FedMoE-Agg weights: n_i over the clients holding expert k (H_k), zero elsewhere.

    Parameters
    ----------
    num_samples
        ``[N]`` sample counts n_i.
    holders
        ``[N, E]`` bool, client i routed at least one token to expert k.

    Returns
    -------
    torch.Tensor
        ``[N, E]`` weights n_i·[i ∈ H_k] / Σ_{j ∈ H_k} n_j; an all-zero column where |H_k| = 0 (keep the expert).
    """
    scores = num_samples.to(torch.float64)[:, None] * holders.to(torch.float64)  # [N, E]
    totals = scores.sum(dim=0, keepdim=True)
    return torch.where(totals > 0, scores / totals.clamp_min(1.0), 0.0).to(torch.float32)


def fedavg_step(global_state: Mapping[str, torch.Tensor], deltas: Sequence[Mapping[str, torch.Tensor]],
                num_samples: Sequence[float], keys: Sequence[str]) -> Tree:
    """θ_key + Σ_i (n_i / Σ_j n_j) Δ_{i,key} for the given keys (FedAvg, Eq. 1 of McMahan et al.)."""
    if not keys:
        return {}
    mean = weighted_mean([{k: d[k] for k in keys} for d in deltas], num_samples)
    return {k: global_state[k] + mean[k] for k in keys}
