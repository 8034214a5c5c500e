"""Gradient consensus projection (FC-MoE step 3), batched over clients and experts.

For one MoE layer, stack every client's expert updates into ``deltas [N, E, P]`` (client i, expert k, the P
flattened parameters of expert k) and the importance weights into ``weights [N, E]``. Per expert k (paper §III-C):

    g_k         = Σ_i w_{i,k} Δ_{i,k}                                  consensus direction
    c_{i,k}     = ⟨Δ_{i,k}, g_k⟩ / ‖g_k‖²   if cos(Δ_{i,k}, g_k) < τ, else 0
    Δ̃_{i,k}    = Δ_{i,k} − c_{i,k} g_k                                 projected update
    ρ_{i,k}     = c_{i,k} g_k                                           residual, kept by client i
    aggregate_k = Σ_i w_{i,k} Δ̃_{i,k} = g_k · (1 − Σ_i w_{i,k} c_{i,k})

The last identity is why the residual can travel as one scalar per (client, expert): ρ_{i,k} is a multiple of
g_k, and so is the aggregate step. :func:`consensus_coefficients` computes g, c and the conflict mask with two
batched matrix products and never materialises an ``[N, E, P]`` output; :func:`consensus_project` builds Δ̃ and ρ
from them (tests and small models; the server step needs only the coefficients).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class ConsensusCoefficients(NamedTuple):
    """The compact form of a projection: everything else is a multiple of ``consensus``."""

    consensus: torch.Tensor  # [E, P]  g_k
    coefficient: torch.Tensor  # [N, E]  c_{i,k}; residual ρ_{i,k} = c_{i,k} · g_k (0 where not conflicted)
    conflicted: torch.Tensor  # [N, E]  bool, cos(Δ_{i,k}, g_k) < τ
    cosine: torch.Tensor  # [N, E]  cos(Δ_{i,k}, g_k), 0 where either vector is zero
    scale: torch.Tensor  # [E]  1 − Σ_i w_{i,k} c_{i,k}; aggregate_k = scale_k · g_k


class ConsensusResult(NamedTuple):
    """Output of :func:`consensus_project`."""

    aggregate: torch.Tensor  # [E, P]  Σ_i w_{i,k} Δ̃_{i,k}
    projected: torch.Tensor  # [N, E, P]  Δ̃
    residual: torch.Tensor  # [N, E, P]  ρ = Δ − Δ̃
    conflicted: torch.Tensor  # [N, E] bool
    consensus: torch.Tensor  # [E, P]  g
    coefficient: torch.Tensor  # [N, E]  c
    cosine: torch.Tensor  # [N, E]


def check_consensus_inputs(deltas: torch.Tensor, weights: torch.Tensor, tau: float) -> None:
    """Raise ``ValueError`` naming the bad shape or value of ``deltas [N, E, P]``, ``weights [N, E]`` or τ."""
    if deltas.dim() != 3:
        raise ValueError(f"deltas must be [N clients, E experts, P params], got shape {tuple(deltas.shape)}")
    if weights.shape != deltas.shape[:2]:
        raise ValueError(f"weights must be [N, E] = {tuple(deltas.shape[:2])}, got {tuple(weights.shape)}")
    if not -1.0 <= tau <= 1.0:
        raise ValueError(f"tau={tau} is a cosine threshold and must lie in [-1, 1]")
    if (weights < 0).any():
        raise ValueError("weights must be non-negative")


def expert_norms(deltas: torch.Tensor) -> torch.Tensor:
    """‖Δ_{i,k}‖ of ``deltas [N, E, P]`` as ``[N, E]``, accumulated in float32 at least."""
    return torch.linalg.vector_norm(deltas, dim=-1, dtype=torch.promote_types(deltas.dtype, torch.float32))


def consensus_coefficients(deltas: torch.Tensor, weights: torch.Tensor, tau: float = 0.0,
                           norms: torch.Tensor | None = None,
                           consensus: torch.Tensor | None = None) -> ConsensusCoefficients:
    """Consensus direction g, projection coefficients c and conflict mask of FC-MoE step 3.

    Parameters
    ----------
    deltas
        ``[N, E, P]`` client updates Δ_{i,k}; never modified. Fastest when each expert's N rows are one
        contiguous matrix (FC-MoE passes one expert at a time, ``[N, 1, P]``: both products are then
        matrix–vector products).
    weights
        ``[N, E]`` importance weights w_{i,k}, each column summing to 1 (or all zero for an expert nobody used).
    tau
        Conflict threshold τ on cos(Δ_{i,k}, g_k) (paper default 0): pairs below it are projected.
    norms
        ``[N, E]`` ‖Δ_{i,k}‖ when the caller has them already (FC-MoE's importance weights need them first).
    consensus
        ``[E, P]`` a direction to use instead of Σ_i w_{i,k} Δ_{i,k} (a robust mean of the same updates);
        conflicts and coefficients are then measured against it.

    Returns
    -------
    ConsensusCoefficients
    """
    check_consensus_inputs(deltas, weights, tau)
    acc = torch.promote_types(deltas.dtype, torch.float32)  # bf16 sums over P ~ 10^6 would lose every digit
    w = weights.to(acc)
    by_expert = deltas.transpose(0, 1).to(acc)  # [E, N, P]
    if consensus is None:
        g = torch.bmm(w.T.unsqueeze(1), by_expert).squeeze(1)  # [E, 1, N] @ [E, N, P] → [E, P]
    else:
        g = consensus.to(acc)
    dots = torch.bmm(by_expert, g.unsqueeze(2)).squeeze(2).T  # [E, N, P] @ [E, P, 1] → [N, E]  ⟨Δ_{i,k}, g_k⟩
    g_norm = torch.linalg.vector_norm(g, dim=-1)  # [E]
    delta_norm = (expert_norms(deltas) if norms is None else norms).to(acc)  # [N, E]
    tiny = torch.finfo(acc).tiny
    denom = delta_norm * g_norm[None, :]  # [N, E]
    # clamped: rounding can put an exactly opposed pair at −1 − ε, and τ = −1 must project nothing
    cosine = torch.where(denom > 0, dots / denom.clamp_min(tiny), 0.0).clamp(-1.0, 1.0)
    conflicted = (cosine < tau) & (denom > 0)
    coefficient = torch.where(conflicted, dots / g_norm.square().clamp_min(tiny)[None, :], 0.0)  # [N, E]
    scale = 1.0 - (w * coefficient).sum(dim=0)  # [E]
    return ConsensusCoefficients(g, coefficient, conflicted, cosine, scale)


def join_experts(parts: list[ConsensusCoefficients]) -> ConsensusCoefficients:
    """The coefficients of a layer from those of its experts (or groups of experts), in expert order."""
    return ConsensusCoefficients(torch.cat([p.consensus for p in parts]), torch.cat([p.coefficient for p in parts], 1),
                                 torch.cat([p.conflicted for p in parts], 1), torch.cat([p.cosine for p in parts], 1),
                                 torch.cat([p.scale for p in parts]))


def consensus_project(deltas: torch.Tensor, weights: torch.Tensor, tau: float = 0.0) -> ConsensusResult:
    """Project every conflicting client update onto the normal plane of the consensus (FC-MoE step 3).

    Parameters
    ----------
    deltas
        ``[N, E, P]`` client updates Δ_{i,k}; never modified.
    weights
        ``[N, E]`` importance weights w_{i,k}, each column summing to 1 over the N clients.
    tau
        Cosine threshold τ (default 0). τ = −1 projects nothing, so the aggregate is the plain weighted mean.

    Returns
    -------
    ConsensusResult
        ``aggregate [E, P]``, ``projected [N, E, P]``, ``residual [N, E, P]``, ``conflicted [N, E]`` and the
        compact fields ``consensus``, ``coefficient``, ``cosine``. ⟨projected_i, g⟩ = 0 for conflicted pairs,
        projected + residual = deltas up to rounding.
    """
    coeffs = consensus_coefficients(deltas, weights, tau)
    g = coeffs.consensus
    residual = (coeffs.coefficient[:, :, None] * g[None, :, :]).to(deltas.dtype)  # [N, E, P]
    return ConsensusResult(
        aggregate=(coeffs.scale[:, None] * g).to(deltas.dtype),  # [E, P]
        projected=deltas - residual,
        residual=residual,
        conflicted=coeffs.conflicted,
        consensus=g.to(deltas.dtype),
        coefficient=coeffs.coefficient,
        cosine=coeffs.cosine,
    )


class PairwiseProjection(NamedTuple):
    """Output of :func:`pairwise_project` for one expert unit."""

    projected: torch.Tensor  # [N, P]  Δ̃_i
    coefficients: torch.Tensor  # [N, N]  Δ̃ = coefficients @ Δ (identity where nothing conflicts)
    conflicted: torch.Tensor  # [N] bool: client i was projected against at least one other


def pairwise_project(deltas: torch.Tensor) -> PairwiseProjection:
    """PCGrad between clients (FedGH-style; the ``fcmoe/pairwise`` ablation of FC-MoE step 3) on one expert unit.

    For each client i and each other client j in index order: if ⟨Δ̃_i, Δ_j⟩ < 0, Δ̃_i ← Δ̃_i − ⟨Δ̃_i, Δ_j⟩ / ‖Δ_j‖² Δ_j,
    starting from Δ̃_i = Δ_i (PCGrad's rule, with a fixed instead of a random order so that runs repeat).

    Every Δ̃_i stays in the span of the Δ_j, so the whole projection runs on the ``[N, N]`` Gram matrix: Δ̃ = C Δ
    with C built from inner products only, and ``deltas [N, P]`` is read twice (Gram, then C Δ).
    """
    if deltas.dim() != 2:
        raise ValueError(f"deltas must be [N clients, P params], got shape {tuple(deltas.shape)}")
    acc = torch.promote_types(deltas.dtype, torch.float32)
    rows = deltas.to(acc)
    gram = (rows @ rows.T).double()  # [N, N]
    n = gram.shape[0]
    coefficients = torch.eye(n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            if i == j or gram[j, j] <= 0:
                continue
            dot = coefficients[i] @ gram[:, j]  # ⟨Δ̃_i, Δ_j⟩
            if dot < 0:
                coefficients[i, j] -= dot / gram[j, j]
    conflicted = (coefficients != torch.eye(n, dtype=torch.float64)).any(dim=1)
    if not conflicted.any():
        return PairwiseProjection(deltas, coefficients, conflicted)
    return PairwiseProjection((coefficients.to(acc) @ rows).to(deltas.dtype), coefficients, conflicted)
