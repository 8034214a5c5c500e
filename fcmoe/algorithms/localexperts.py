"""Local experts, FLEx-style (Liu et al. 2025, arXiv 2506.00965): experts are never averaged.

Shared parameters (everything that is neither an expert nor a router row) by FedAvg. Each client keeps its own
experts and router rows in its private state: it trains from the global shared part plus its own experts, uploads
only the shared part of Δ_i, and its deployed (personalised) model is that same combination. The global model is
the averaged shared part with the initial experts and routers, which therefore never change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fcmoe.algorithms.base import Algorithm, AlgorithmConfig, ClientRuntime, ClientUpdate, ServerResult
from fcmoe.core import WEIGHTED_MEAN, MeanRule, Tree
from fcmoe.models.outputs import Prediction
from fcmoe.registry import register_algorithm

if TYPE_CHECKING:  # a hint only: importing training would load transformers with every config
    from fcmoe.training.local import FeatureSet

PRIVATE = "local_experts"  # client state: the client's own experts and router rows


@register_algorithm("localexperts")
class LocalExperts(Algorithm):
    """FedAvg on the shared parameters; experts and routers stay on the client."""

    display_name = "Local experts"
    config_class = AlgorithmConfig

    def _private_keys(self) -> list[str]:
        return [*self.layout.expert_keys, *self.layout.router_keys]

    # ------------------------------------------------------------------ client half
    def client_start(self, global_state: Tree, client_state: dict[str, Any]) -> Tree:
        """The global shared part with the client's own experts and routers (the initial ones at first)."""
        own = client_state.get(PRIVATE)
        return global_state if own is None else {**global_state, **own}

    def prepare_upload(self, client_state: dict[str, Any], update: ClientUpdate, trained: Tree) -> ClientUpdate:
        """Keep the trained experts and routers; send only the shared part of Δ_i."""
        private = self._private_keys()
        client_state[PRIVATE] = {k: trained[k].detach().clone() for k in private}
        shared = set(self.upload_keys(update.delta))
        return dataclasses.replace(update, delta={k: v for k, v in update.delta.items() if k in shared})

    def deployed_prediction(self, runtime: ClientRuntime, client_state: dict[str, Any], global_state: Tree,
                            data: FeatureSet) -> Prediction:
        return runtime.predict(self.client_start(global_state, client_state), data)

    # ------------------------------------------------------------------ server half
    def upload_keys(self, global_state: Tree) -> list[str]:
        private = set(self._private_keys())
        return [k for k in global_state if k not in private]

    def aggregate(self, global_state: Tree, updates: Sequence[ClientUpdate],
                  mean: MeanRule = WEIGHTED_MEAN) -> ServerResult:
        state = dict(global_state)
        state.update(self.fedavg(global_state, updates, self.layout.shared_keys, mean))
        return ServerResult(global_state=state)
