"""FedMoE-Agg (Mei et al. 2024, arXiv 2408.11304): activated-expert modular aggregation.

Shared parameters by FedAvg. For each expert unit (l, k), the holders H are the clients that routed at least one
token to it: |H| = 0 keeps the expert, |H| = 1 copies that client's expert, otherwise the n-weighted mean over H.
Router rows follow the same rule (row k of a router belongs to expert k).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fcmoe.algorithms.base import Algorithm, AlgorithmConfig, ClientUpdate, ServerResult
from fcmoe.core import WEIGHTED_MEAN, MeanRule, Tree, holder_weights
from fcmoe.registry import register_algorithm


@dataclass(frozen=True)
class FedMoEConfig(AlgorithmConfig):
    """FedMoE-Agg; the FedMoE-Sub expert budget is not implemented yet.

    Attributes
    ----------
    min_share
        A client holds expert k when it routed at least one token to k *and* at least this share of its tokens
        in that layer (default 0: one token is enough, as in FedMoE-Agg). With 10,000 tokens per client every
        expert usually gets one, and FedMoE-Agg then equals FedAvg; a share such as 0.02 makes holding selective.
    """

    min_share: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_share < 1.0:
            raise ValueError(f"fedmoe.min_share = {self.min_share}: must be in [0, 1), e.g. 0.02")


@register_algorithm("fedmoe")
class FedMoE(Algorithm):
    """Expert units averaged over the clients that activated them."""

    display_name = "FedMoE"
    config_class = FedMoEConfig
    config: FedMoEConfig

    def aggregate(self, global_state: Tree, updates: Sequence[ClientUpdate],
                  mean: MeanRule = WEIGHTED_MEAN) -> ServerResult:
        layout = self.layout
        state = dict(global_state)
        state.update(self.fedavg(global_state, updates, layout.shared_keys, mean))
        n = torch.tensor([u.num_samples for u in updates])
        held = []
        for layer in layout.layers:
            holders = torch.stack([(u.routing_counts[layer.name] > 0)
                                   & (u.frequencies(layer.name) >= self.config.min_share) for u in updates])  # [N, E]
            weights = holder_weights(n, holders)  # [N, E]
            step = self.expert_means([u.delta for u in updates], layer, weights, mean)  # [E, P]
            state = layout.scatter_experts(state, layer, layout.gather_experts(global_state, layer) + step)
            router_deltas = torch.stack([layout.gather_router(u.delta, layer) for u in updates])  # [N, E, R]
            router = layout.gather_router(global_state, layer) + mean.per_expert(router_deltas, weights)
            state = layout.scatter_router(state, layer, router)
            held.append(holders.sum(dim=0).float().mean().item())
        return ServerResult(state=state, metrics={"mean_holders_per_expert": sum(held) / max(len(held), 1)})
