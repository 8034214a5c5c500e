"""Robustness as a wrapper around any registered algorithm's server half (as Flower wraps strategies for
differential privacy): screening, per-unit clipping and a robust inner mean, all from one ``RobustConfig``.

    server = RobustAggregation(algorithm, config.robust)
    accepted, rejected = server.admit(updates, θ)      # screen, then clip the accepted ones
    result = server.aggregate(θ, accepted)             # the algorithm's own rule, with the configured mean

The algorithm itself has no robust mode: the wrapper hands it a :class:`~fcmoe.core.MeanRule` (the weighted mean
for ``aggregator = "mean"``, else :class:`~fcmoe.core.CoordinateMean`) and every mean over clients goes through it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fcmoe.algorithms.base import Algorithm, ClientUpdate, ServerResult
from fcmoe.config_sections import ConfigError, _positive
from fcmoe.core import WEIGHTED_MEAN, CoordinateMean, MeanRule, Tree, clip_factors, row_squared_norms, tree_norm
from fcmoe.core.validate import update_problem
from fcmoe.models.layout import ExpertLayout


@dataclass(frozen=True)
class RobustConfig:
    """What the server accepts and how it combines updates (both engines).

    Attributes
    ----------
    max_norm_ratio
        Reject an update whose norm exceeds this multiple of the round's median update norm (with ≥ 3 valid
        updates; 0 = off). Malformed updates (missing or extra keys, wrong shapes or dtypes, NaN / Inf) are always
        rejected.
    min_clients
        Fewer accepted updates than this keep the global model; the round is marked skipped.
    clip
        Clip each client's update per unit (every MoE expert, and all other parameters together) to this multiple
        of the round's median norm of that unit (0 = off).
    aggregator
        Inner aggregator over clients: "mean" (each algorithm's own weights), or coordinate-wise "trimmed_mean" /
        "median" (unweighted, over the clients holding the unit).
    trim_fraction
        trimmed_mean: the share of clients cut at each end of every coordinate.
    """

    max_norm_ratio: float = 10.0
    min_clients: int = 1
    clip: float = 0.0
    aggregator: str = "mean"
    trim_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not self.max_norm_ratio >= 0 or 0 < self.max_norm_ratio <= 1:
            raise ConfigError(f"robust.max_norm_ratio = {self.max_norm_ratio}: must be > 1 (e.g. 10) or 0 (off)")
        _positive("robust.min_clients", self.min_clients)
        if not self.clip >= 0:
            raise ConfigError(f"robust.clip = {self.clip}: must be >= 0 (a multiple of the median norm; 0 = off)")
        if self.aggregator not in AGGREGATORS:
            raise ConfigError(f"robust.aggregator = {self.aggregator!r}: choose one of {', '.join(AGGREGATORS)}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"robust.trim_fraction = {self.trim_fraction}: must be in [0, 0.5)")


AGGREGATORS = ("mean", "trimmed_mean", "median")


class RobustAggregation:
    """``algorithm``'s server half behind the gate and with the inner mean that ``config`` asks for."""

    def __init__(self, algorithm: Algorithm, config: RobustConfig) -> None:
        self.algorithm = algorithm
        self.config = config
        self.mean: MeanRule = (WEIGHTED_MEAN if config.aggregator == "mean"
                               else CoordinateMean(config.aggregator, config.trim_fraction))

    def admit(self, updates: Sequence[ClientUpdate], global_state: Tree) -> tuple[list[ClientUpdate], list[str]]:
        """:func:`screen_updates`, then :func:`clip_updates` on the accepted ones; (accepted, reasons rejected)."""
        layout = self.algorithm.layout
        expected = {k: global_state[k] for k in self.algorithm.upload_keys(global_state)}
        accepted, rejected = screen_updates(updates, expected, layout, self.config.max_norm_ratio)
        return clip_updates(accepted, layout, self.config.clip), rejected

    def aggregate(self, global_state: Tree, updates: Sequence[ClientUpdate]) -> ServerResult:
        """The wrapped algorithm's aggregation with the configured mean rule."""
        return self.algorithm.aggregate(global_state, updates, self.mean)


def screen_updates(updates: Sequence[ClientUpdate], expected: Tree, layout: ExpertLayout,
                   max_norm_ratio: float) -> tuple[list[ClientUpdate], list[str]]:
    """Split the round's updates into accepted and rejected (with one-line reasons), before any aggregation.

    ``expected`` is the part of the global tree a Δ_i must cover (:meth:`Algorithm.upload_keys`). Rejected: a
    malformed update (:func:`fcmoe.core.validate.update_problem`: keys, shapes, dtypes, NaN / Inf, routing counts,
    n_i, non-finite statistics), and, with at least 3 well-formed updates and ``max_norm_ratio > 0``, one whose norm
    ‖Δ_i‖ exceeds ``max_norm_ratio`` × the median norm of the round (a scaled or exploding update).
    """
    layers = {spec.name: spec.num_experts for spec in layout.layers}
    accepted, rejected = [], []
    for update in updates:
        problem = update_problem(update.delta, expected, update.routing_counts, layers, update.num_samples,
                                 update.statistics)
        if problem:
            rejected.append(f"client {update.client_id}: {problem}")
        else:
            accepted.append(update)
    if max_norm_ratio > 0 and len(accepted) >= 3:
        norms = torch.stack([tree_norm(u.delta) for u in accepted])  # [N]
        median = norms.median()
        keep = norms <= max_norm_ratio * median
        rejected += [f"client {u.client_id}: update norm {norm:.4g} is {norm / median:.1f}× the round's median "
                     f"{median:.4g} (robust.max_norm_ratio = {max_norm_ratio:g})"
                     for u, norm, ok in zip(accepted, norms.tolist(), keep.tolist(), strict=True) if not ok]
        accepted = [u for u, ok in zip(accepted, keep.tolist(), strict=True) if ok]
    return accepted, rejected


def clip_updates(updates: Sequence[ClientUpdate], layout: ExpertLayout, multiple: float) -> list[ClientUpdate]:
    """``robust.clip``: each client's update clipped per unit to ``multiple`` × the round's median norm of that unit.

    Units are every expert of every MoE layer and, together, all other parameters
    (:func:`fcmoe.core.clip_factors`). Returns new updates; the inputs are not modified.
    """
    if multiple <= 0 or not updates:
        return list(updates)
    expert_keys = set(layout.expert_keys)
    rest = [k for k in updates[0].delta if k not in expert_keys]
    rest_norms = torch.stack([tree_norm({k: u.delta[k] for k in rest}) for u in updates])  # [N]
    rest_factor = clip_factors(rest_norms[:, None], multiple)[:, 0]  # [N]
    clipped = [{k: u.delta[k] * float(rest_factor[i]) for k in rest} for i, u in enumerate(updates)]
    for layer in [layer for layer in layout.layers if layout.holds_experts(updates[0].delta, layer)]:
        blocks = [layout.gather_experts(u.delta, layer) for u in updates]  # N × [E, P]
        factors = clip_factors(torch.stack([row_squared_norms(b) for b in blocks]).sqrt(), multiple)  # [N, E]
        for i, block in enumerate(blocks):
            scaled = block * factors[i].to(block.dtype)[:, None]
            clipped[i].update({k: v.to(updates[i].delta[k].dtype)
                               for k, v in layout.split_experts(layer, scaled).items()})
    return [dataclasses.replace(u, delta=delta) for u, delta in zip(updates, clipped, strict=True)]
