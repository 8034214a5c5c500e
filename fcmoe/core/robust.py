"""Robust aggregation on plain tensors: per-unit norm clipping and coordinate-wise trimmed mean / median.

A *unit* is what FC-MoE weighs separately: one expert of one MoE layer, or all other parameters together. Clipping
bounds each client's influence per unit to a multiple of the round's median norm of that unit; the coordinate-wise
aggregators replace a weighted mean by a statistic that a minority of arbitrary values cannot move far (Yin et al.
2018: the median tolerates < 50 % Byzantine clients, the β-trimmed mean < β).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

ROBUST_AGGREGATORS = ("trimmed_mean", "median")


def clip_factors(norms: torch.Tensor, multiple: float) -> torch.Tensor:
    """Scale factors that clip each client's unit norm to ``multiple`` × that unit's median over clients.

    Parameters
    ----------
    norms
        ``[N, U]`` ‖Δ_{i,u}‖ per client and unit; zeros (a unit the client did not update) are left out of the
        median and keep factor 1.
    multiple
        The clipping threshold as a multiple of the median (> 0).

    Returns
    -------
    torch.Tensor
        ``[N, U]`` factors in (0, 1]: ``min(1, multiple · median_u / ‖Δ_{i,u}‖)``.
    """
    if not multiple > 0:
        raise ValueError(f"clip multiple must be > 0, got {multiple}")
    norms = norms.to(torch.float64)
    present = norms > 0
    masked = torch.where(present, norms, torch.nan)
    median = torch.nanmedian(masked, dim=0).values  # [U]; NaN where nobody updated the unit
    limit = multiple * median[None, :]
    factors = torch.where(present & (norms > limit), limit / norms.clamp_min(1e-300), 1.0)
    return torch.nan_to_num(factors, nan=1.0)


def coordinate_aggregate(values: torch.Tensor, kind: str, trim_fraction: float = 0.1,
                         present: torch.Tensor | None = None) -> torch.Tensor:
    """Coordinate-wise median or trimmed mean over the client axis, per group.

    Parameters
    ----------
    values
        ``[G, N, P]``: G groups (experts; 1 for plain parameters), N clients, P coordinates. Never modified.
    kind
        "median" (the lower median for even counts, as ``torch.median``) or "trimmed_mean" (drop
        ``floor(trim_fraction · m)`` values at each end of every coordinate, m = clients present in the group).
    trim_fraction
        β in [0, 0.5).
    present
        ``[G, N]`` bool: client i takes part in group g (default: all). A group with no client aggregates to 0.

    Returns
    -------
    torch.Tensor
        ``[G, P]`` in at least float32.
    """
    if kind not in ROBUST_AGGREGATORS:
        raise ValueError(f"unknown robust aggregator {kind!r}; choose one of {', '.join(ROBUST_AGGREGATORS)}")
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    groups, clients, _ = values.shape
    acc = torch.promote_types(values.dtype, torch.float32)
    present = torch.ones(groups, clients, dtype=torch.bool) if present is None else present
    masked = torch.where(present[:, :, None], values.to(acc), torch.nan)  # absent clients sort last as NaN
    counts = present.sum(dim=1)  # [G]
    if kind == "median":
        return torch.nan_to_num(torch.nanmedian(masked, dim=1).values, nan=0.0)
    ordered = masked.sort(dim=1).values  # [G, N, P], NaNs at the end
    cut = torch.floor(trim_fraction * counts.to(torch.float64)).to(torch.long)  # [G]
    rank = torch.arange(clients)[None, :]  # [1, N]
    keep = (rank >= cut[:, None]) & (rank < (counts - cut)[:, None])  # [G, N]
    total = torch.where(keep[:, :, None], ordered, 0.0).sum(dim=1)  # [G, P]
    return total / keep.sum(dim=1).clamp_min(1)[:, None].to(acc)


@dataclass(frozen=True)
class CoordinateMean:
    """A :class:`~fcmoe.core.aggregate.MeanRule` that takes the coordinate-wise median or trimmed mean over the
    clients a weight is given to (the weights' values are ignored: a robust statistic is unweighted).

    Attributes
    ----------
    kind
        "median" or "trimmed_mean".
    trim_fraction
        β of the trimmed mean, in [0, 0.5).
    """

    kind: str
    trim_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in ROBUST_AGGREGATORS:
            raise ValueError(f"unknown robust aggregator {self.kind!r}; choose one of {', '.join(ROBUST_AGGREGATORS)}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}")

    def over_clients(self, values: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
        stacked = torch.stack([v.reshape(-1) for v in values])[None]  # [1, N, numel]
        present = torch.tensor([w > 0 for w in weights])[None]  # [1, N]
        return coordinate_aggregate(stacked, self.kind, self.trim_fraction, present).reshape(values[0].shape)

    def per_expert(self, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return coordinate_aggregate(deltas.transpose(0, 1), self.kind, self.trim_fraction, (weights > 0).T)

    def over_rows(self, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.per_expert(rows[:, None, :], weights[:, None])[0]
