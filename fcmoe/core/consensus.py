"""Gradient consensus projection (FC-MoE step 3), batched over clients and experts.

For one MoE layer, stack every client's expert updates into ``deltas [N, E, P]`` (client i, expert k, the P
flattened parameters of expert k) and the importance weights into ``weights [N, E]``. Per expert k:

    g_k        = Σ_i w_{i,k} Δ_{i,k}                                   (consensus direction)
    c_{i,k}    = ⟨Δ_{i,k}, g_k⟩ / ‖g_k‖²    if cos(Δ_{i,k}, g_k) < τ, else 0
    Δ̃_{i,k}   = Δ_{i,k} − c_{i,k} g_k                                  (projected update)
    ρ_{i,k}    = c_{i,k} g_k                                            (residual, kept by the client)
    aggregate_k = Σ_i w_{i,k} Δ̃_{i,k} = g_k · (1 − Σ_i w_{i,k} c_{i,k})

The last identity is why the residual can travel as one scalar per (client, expert): ρ_{i,k} is a multiple of
g_k, and so is the aggregate step. :func:`consensus_coefficients` computes only g, c and the mask (O(N·E·P) reads,
O(E·P) writes); :func:`consensus_project` also materialises the projected updates and residuals;
:func:`streamed_consensus_coefficients` computes what the first does from column blocks of the deltas, in one read
(:mod:`fcmoe.core.one_read` feeds it, or does the same read with a native kernel).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch

from fcmoe.core.aggregate import expert_weighted_mean


class ConsensusCoefficients(NamedTuple):
    """The compact form of a projection: everything else is a multiple of ``consensus``."""

    consensus: torch.Tensor  # [E, P]  g_k = Σ_i w_{i,k} Δ_{i,k}
    coefficient: torch.Tensor  # [N, E]  c_{i,k}; residual ρ_{i,k} = c_{i,k} · g_k (0 where not conflicted)
    conflicted: torch.Tensor  # [N, E]  bool, cos(Δ_{i,k}, g_k) < τ
    cosine: torch.Tensor  # [N, E]  cos(Δ_{i,k}, g_k), 0 where either vector is zero
    scale: torch.Tensor  # [E]  1 − Σ_i w_{i,k} c_{i,k}; aggregate_k = scale_k · g_k
    read_norm: torch.Tensor | None = None  # [N, E]  ‖Δ_{i,k}‖ as the one read measured it (to check given ones)


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


def check_weights_and_norms(weights: torch.Tensor, norms: torch.Tensor, tau: float) -> None:
    """:func:`check_consensus_inputs` for the forms that get the deltas in pieces: ``weights`` and ``norms`` both
    ``[N, E]``."""
    if weights.shape != norms.shape:
        raise ValueError(f"weights {tuple(weights.shape)} and norms {tuple(norms.shape)} must both be [N, E]")
    check_consensus_inputs(torch.empty(*weights.shape, 0), weights, tau)


def consensus_coefficients(deltas: torch.Tensor, weights: torch.Tensor, tau: float = 0.0,
                           norms: torch.Tensor | None = None,
                           consensus: torch.Tensor | None = None) -> ConsensusCoefficients:
    """Consensus direction, projection coefficients and conflict mask, without materialising [N, E, P] outputs.

    Two reads of the deltas (plus one for the norms unless given): g by one batched matrix product
    ``[E, 1, N] @ [E, N, P]``, the inner products ⟨Δ_{i,k}, g_k⟩ by another, ``[E, 1, P] @ [E, P, N]``. Both run at
    memory speed when ``deltas`` is the transposed view of an expert-major ``[E, N, P]`` buffer
    (:meth:`~fcmoe.models.layout.ExpertLayout.gather_experts_batched`); any other strides are correct, only slower.

    Parameters
    ----------
    deltas
        ``[N, E, P]`` client updates Δ_{i,k}; never modified.
    weights
        ``[N, E]`` importance weights, each column summing to 1 (or all zero for an expert nobody used).
    tau
        Conflict threshold on the cosine to the consensus (paper τ, default 0): pairs with cos < τ are projected.
    norms
        ``[N, E]`` ‖Δ_{i,k}‖ if the caller already has them (FC-MoE's importance needs them first).
    consensus
        ``[E, P]`` a consensus direction to use instead of Σ_i w_{i,k} Δ_{i,k} (a robust aggregator's, e.g. the
        coordinate-wise median); conflicts and coefficients are then measured against it.

    Returns
    -------
    ConsensusCoefficients
    """
    check_consensus_inputs(deltas, weights, tau)
    # Accumulate in float32 at least: bf16 sums over P ~ 10^6 lose every digit.
    acc = torch.promote_types(deltas.dtype, torch.float32)
    w = weights.to(acc)
    by_expert = deltas.transpose(0, 1).to(acc)  # [E, N, P]
    g = expert_weighted_mean(deltas, w) if consensus is None else consensus.to(acc)  # [E, P]
    dots = torch.bmm(g.unsqueeze(1), by_expert.transpose(1, 2)).squeeze(1).T  # [N, E]  ⟨Δ_{i,k}, g_k⟩
    delta_norm = torch.linalg.vector_norm(by_expert, dim=-1).T if norms is None else norms  # [N, E]
    return coefficients_from_sums(g, (g * g).sum(dim=-1), dots, delta_norm.to(acc), w, tau)


def streamed_consensus_coefficients(blocks: Iterable[tuple[int, torch.Tensor]], weights: torch.Tensor,
                                    norms: torch.Tensor, numel: int, tau: float = 0.0,
                                    out: torch.Tensor | None = None) -> ConsensusCoefficients:
    """:func:`consensus_coefficients` from column blocks of the deltas, reading each block once.

    The two passes of the batched form (g, then ⟨Δ, g⟩) each read all N·E·P values from memory. Here every block
    ``[E, N, c]`` (columns ``offset:offset + c`` of every Δ_{i,k}) is small enough to stay in cache: its slice of g
    is computed from it and its share of ⟨Δ_{i,k}, g_k⟩ right after, while it is still there. With the norms given
    (FC-MoE's importance needs them before g), the deltas are read from memory once in total, and no
    ``[E, N, P]`` copy of them is ever made (:func:`~fcmoe.core.one_read.segment_blocks`).

    Parameters
    ----------
    blocks
        ``(offset, block)`` pairs covering columns ``0 … numel`` exactly once; ``block [E, N, c]`` holds columns
        ``offset:offset + c`` of Δ_{i,k} at ``[k, i]``. A block may be overwritten once the next one is asked for.
    weights
        ``[N, E]`` importance weights, each column summing to 1 (or all zero for an expert nobody used).
    norms
        ``[N, E]`` ‖Δ_{i,k}‖ over all ``numel`` columns.
    numel
        P, the parameters per expert.
    tau
        Conflict threshold τ on the cosine to the consensus (default 0).
    out
        ``[E, P]`` buffer for g, used when its shape and accumulation dtype fit: a fresh one costs a page fault per
        page on first write (0.73 s for 400 MB of 4 KiB pages on our 2-core VM, more than the whole read).

    Returns
    -------
    ConsensusCoefficients
        Equal to :func:`consensus_coefficients` on the stacked deltas, up to float rounding; ``consensus`` is
        ``out`` when it was used.
    """
    check_weights_and_norms(weights, norms, tau)
    n, e = weights.shape
    g = torch.zeros(e, 0)  # [E, P] once the first block says the accumulation dtype
    dots, g_sq = torch.zeros(e, n), torch.zeros(e)  # [E, N] ⟨Δ_{i,k}, g_k⟩ and [E] ‖g_k‖², summed over blocks
    squares = torch.zeros(e, n, dtype=torch.float64)  # [E, N] ‖Δ_{i,k}‖², from the cached block: no extra read
    covered = 0
    for offset, block in blocks:
        if block.dim() != 3 or block.shape[:2] != (e, n) or offset != covered:
            raise ValueError(f"block at column {offset} has shape {tuple(block.shape)}; expected [{e}, {n}, c] "
                             f"starting at column {covered}")
        if covered == 0:  # accumulate in float32 at least: bf16 sums over P ~ 10^6 lose every digit
            acc = torch.promote_types(block.dtype, torch.float32)
            fits = out is not None and out.shape == (e, numel) and out.dtype == acc
            g = out if fits else torch.empty(e, numel, dtype=acc)
            dots, g_sq = dots.to(acc), g_sq.to(acc)
            w_by_expert = weights.to(acc).T.unsqueeze(1)  # [E, 1, N]
        rows = block.to(acc)  # [E, N, c]; a copy only for bf16 blocks, and a cache-sized one
        g_block = torch.bmm(w_by_expert, rows)  # [E, 1, c]
        g[:, offset:offset + block.shape[2]] = g_block.squeeze(1)
        dots += torch.bmm(rows, g_block.transpose(1, 2)).squeeze(2)  # [E, N, c] @ [E, c, 1] → [E, N]
        g_sq += g_block.square().sum(dim=(1, 2))
        squares += torch.linalg.vector_norm(rows, dim=2).double().square()  # no [E, N, c] temporary
        covered += block.shape[2]
    if covered != numel:
        raise ValueError(f"blocks covered {covered} columns of {numel}")
    coeffs = coefficients_from_sums(g, g_sq, dots.T, norms.to(g.dtype), weights.to(g.dtype), tau)
    return coeffs._replace(read_norm=squares.T.sqrt().to(norms.dtype))


def coefficients_from_sums(g: torch.Tensor, g_sq: torch.Tensor, dots: torch.Tensor, delta_norm: torch.Tensor,
                           w: torch.Tensor, tau: float) -> ConsensusCoefficients:
    """Cosines, conflict mask, c_{i,k} and scale_k from g ``[E, P]``, ‖g_k‖² ``[E]``, ⟨Δ_{i,k}, g_k⟩ and ‖Δ_{i,k}‖
    (both ``[N, E]``)."""
    acc = g.dtype
    denom = delta_norm * g_sq.sqrt()[None, :]  # [N, E]
    cosine = torch.where(denom > 0, dots / denom.clamp_min(torch.finfo(acc).tiny), torch.zeros_like(dots))
    conflicted = (cosine < tau) & (denom > 0)
    coefficient = torch.where(conflicted, dots / g_sq.clamp_min(torch.finfo(acc).tiny)[None, :], 0.0)  # [N, E]
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
        ``aggregate [E, P]``, ``projected [N, E, P]``, ``residual [N, E, P]``, ``conflicted [N, E]`` and the
        compact fields ``consensus``, ``coefficient``, ``cosine``. ⟨projected_i, g⟩ = 0 for conflicted pairs,
        projected + residual = deltas exactly up to rounding.
    """
    coeffs = consensus_coefficients(deltas, weights, tau)
    g = coeffs.consensus
    residual = (coeffs.coefficient[:, :, None] * g[None, :, :]).to(deltas.dtype)  # [N, E, P]
    projected = deltas - residual  # [N, E, P]
    aggregate = (coeffs.scale[:, None] * g).to(deltas.dtype)  # [E, P]
    return ConsensusResult(
        aggregate=aggregate,
        projected=projected,
        residual=residual,
        conflicted=coeffs.conflicted,
        consensus=g.to(deltas.dtype),
        coefficient=coeffs.coefficient,
        cosine=coeffs.cosine,
    )
