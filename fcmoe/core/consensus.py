"""Gradient consensus projection (FC-MoE step 3), one expert unit at a time.

For one expert k of one MoE layer, stack the N clients' updates into ``deltas [N, P]`` (row i: client i's Δ_i of
expert k, flattened) and their importance weights into ``weights [N]`` (step 2). Then (paper §III-C):

    g        = Σ_i w_i Δ_i                                      consensus direction
    c_i      = ⟨Δ_i, g⟩ / ‖g‖²   if cos(Δ_i, g) < τ, else 0       projection coefficient
    Δ̃_i     = Δ_i − c_i g                                       projected update
    ρ_i      = c_i g                                             removed from client i (it keeps it, step 5)
    Σ_i w_i Δ̃_i = (1 − Σ_i w_i c_i) · g = scale · g              the expert's step (step 4)

The last identity is why ρ_i travels as one scalar per (client, expert): it and the step are both multiples of g.
:func:`consensus_step` computes g, c and scale with two matrix–vector products and never builds a Δ̃;
:func:`pairwise_step` is the PCGrad ablation with the same result type. :func:`consensus_project` is the batched
``[N, E, P]`` form that builds Δ̃ and ρ (a test oracle and small models).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fcmoe.core.aggregate import WEIGHTED_MEAN, MeanRule


class ExpertStep(NamedTuple):
    """One expert unit's server step: the expert moves by η · scale · direction, and client i keeps ρ_i."""

    direction: torch.Tensor  # [P]  consensus: g; pairwise: Σ_i w_i Δ̃_i
    scale: torch.Tensor  # []  consensus: 1 − Σ_i w_i c_i (Σ_i w_i Δ̃_i = scale · g); pairwise: 1
    removed: torch.Tensor  # consensus: [N] c_i, ρ_i = c_i · g; pairwise: [m, P] ρ_i of the m conflicted clients
    conflicted: torch.Tensor  # [N] bool: client i's update was projected
    cosine: torch.Tensor | None  # [N] cos(Δ_i, g), 0 where either is zero (consensus only)
    unprojected: torch.Tensor  # [P] the step without projection, for the diagnostics (consensus: g)


def consensus_step(deltas: torch.Tensor, weights: torch.Tensor, tau: float | None,
                   mean: MeanRule = WEIGHTED_MEAN, norms: torch.Tensor | None = None) -> ExpertStep:
    """FC-MoE step 3 on one expert unit (module docstring): the consensus g, the conflicts, the coefficients c.

    Parameters
    ----------
    deltas
        ``[N, P]`` client updates Δ_i; never modified.
    weights
        ``[N]`` importance weights w_i, summing to 1 (all zero: nobody used the expert, which keeps its value).
    tau
        Conflict threshold τ on cos(Δ_i, g) (paper default 0; −1 projects nothing); ``None``: no projection.
    mean
        How g is taken: Σ_i w_i Δ_i as published, or a robust mean of the same rows
        (:class:`~fcmoe.core.robust.CoordinateMean`); conflicts are measured against it.
    norms
        ``[N]`` ‖Δ_i‖ when the caller has them already (step 2 needs them first).
    """
    acc = torch.promote_types(deltas.dtype, torch.float32)  # bf16 sums over P ~ 10^6 would lose every digit
    g = mean.over_rows(deltas, weights).to(acc)  # [P]
    dots = deltas.to(acc) @ g  # [N]  ⟨Δ_i, g⟩
    g_norm = torch.linalg.vector_norm(g)
    denom = (expert_norms(deltas) if norms is None else norms).to(acc) * g_norm  # [N]  ‖Δ_i‖ ‖g‖
    tiny = torch.finfo(acc).tiny
    # clamped: rounding can put an exactly opposed pair at −1 − ε, and τ = −1 must project nothing
    cosine = torch.where(denom > 0, dots / denom.clamp_min(tiny), 0.0).clamp(-1.0, 1.0)  # [N]
    conflicted = (cosine < (-1.0 if tau is None else tau)) & (denom > 0)
    coefficient = torch.where(conflicted, dots / g_norm.square().clamp_min(tiny), 0.0)  # [N]  c_i
    scale = 1.0 - (weights.to(acc) * coefficient).sum()  # ≥ 1 for τ ≤ 0: conflicting c_i are negative
    return ExpertStep(g, scale, coefficient, conflicted, cosine, g)


def pairwise_step(deltas: torch.Tensor, weights: torch.Tensor, tau: float | None,
                  mean: MeanRule = WEIGHTED_MEAN, norms: torch.Tensor | None = None) -> ExpertStep:
    """The ``fcmoe/pairwise`` ablation of step 3 on one expert unit: PCGrad between the clients
    (:func:`pairwise_project`), then the ``mean`` of the projected updates Δ̃_i. PCGrad's own rule
    (⟨Δ̃_i, Δ_j⟩ < 0) picks the pairs whatever τ is; ``tau = None`` turns the projection off. ``norms`` is not
    needed."""
    projection = pairwise_project(deltas) if tau is not None else None
    projected = deltas if projection is None else projection.projected  # [N, P]  Δ̃_i
    step = mean.over_rows(projected, weights)  # [P]
    one = torch.ones((), dtype=step.dtype)
    if projection is None or not projection.conflicted.any():
        none = torch.zeros(len(deltas), dtype=torch.bool)
        return ExpertStep(step, one, deltas.new_zeros(0, deltas.shape[1], dtype=torch.float32), none, None, step)
    removed = (deltas - projected)[projection.conflicted].float()  # [m, P]  ρ_i = Δ_i − Δ̃_i
    return ExpertStep(step, one, removed, projection.conflicted, None, mean.over_rows(deltas, weights))


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
    removed: torch.Tensor  # [N, E, P]  ρ = Δ − Δ̃
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
    """‖Δ‖ over the last dimension (``[N, P]`` → ``[N]``, ``[N, E, P]`` → ``[N, E]``), accumulated in float32 at
    least."""
    return torch.linalg.vector_norm(deltas, dim=-1, dtype=torch.promote_types(deltas.dtype, torch.float32))


def consensus_coefficients(deltas: torch.Tensor, weights: torch.Tensor, tau: float = 0.0) -> ConsensusCoefficients:
    """g, c, the conflicts and the scale of every expert of a layer at once (``deltas [N, E, P]``, ``weights
    [N, E]``): the batched form of :func:`consensus_step`, with two batched matrix products."""
    check_consensus_inputs(deltas, weights, tau)
    acc = torch.promote_types(deltas.dtype, torch.float32)
    w = weights.to(acc)
    by_expert = deltas.transpose(0, 1).to(acc)  # [E, N, P]
    g = torch.bmm(w.T.unsqueeze(1), by_expert).squeeze(1)  # [E, 1, N] @ [E, N, P] → [E, P]
    dots = torch.bmm(by_expert, g.unsqueeze(2)).squeeze(2).T  # [E, N, P] @ [E, P, 1] → [N, E]  ⟨Δ_{i,k}, g_k⟩
    g_norm = torch.linalg.vector_norm(g, dim=-1)  # [E]
    tiny = torch.finfo(acc).tiny
    denom = expert_norms(deltas).to(acc) * g_norm[None, :]  # [N, E]
    cosine = torch.where(denom > 0, dots / denom.clamp_min(tiny), 0.0).clamp(-1.0, 1.0)
    conflicted = (cosine < tau) & (denom > 0)
    coefficient = torch.where(conflicted, dots / g_norm.square().clamp_min(tiny)[None, :], 0.0)  # [N, E]
    scale = 1.0 - (w * coefficient).sum(dim=0)  # [E]
    return ConsensusCoefficients(g, coefficient, conflicted, cosine, scale)


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
        ``aggregate [E, P]``, ``projected [N, E, P]``, ``removed [N, E, P]``, ``conflicted [N, E]`` and the
        compact fields ``consensus``, ``coefficient``, ``cosine``. ⟨projected_i, g⟩ = 0 for conflicted pairs,
        projected + removed = deltas up to rounding.
    """
    coeffs = consensus_coefficients(deltas, weights, tau)
    g = coeffs.consensus
    removed = (coeffs.coefficient[:, :, None] * g[None, :, :]).to(deltas.dtype)  # [N, E, P]
    return ConsensusResult(
        aggregate=(coeffs.scale[:, None] * g).to(deltas.dtype),  # [E, P]
        projected=deltas - removed,
        removed=removed,
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
