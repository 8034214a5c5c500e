"""FedAvg (McMahan et al. 2017): θ ← θ + Σ_i (n_i / Σ_j n_j) Δ_i for every parameter."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fcmoe.algorithms.base import Algorithm, AlgorithmConfig, ClientUpdate, ServerResult
from fcmoe.core import WEIGHTED_MEAN, MeanRule, Tree
from fcmoe.registry import register_algorithm


@dataclass(frozen=True)
class FedAvgConfig(AlgorithmConfig):
    """FedAvg has no options."""


@register_algorithm("fedavg")
class FedAvg(Algorithm):
    """Sample-weighted averaging of every update; the deployed local model is the global one."""

    display_name = "FedAvg"
    config_class = FedAvgConfig

    def aggregate(self, global_state: Tree, updates: Sequence[ClientUpdate],
                  mean: MeanRule = WEIGHTED_MEAN) -> ServerResult:
        return ServerResult(global_state=self.fedavg(global_state, updates, list(global_state), mean))
