"""HFedMoE's aggregation (Fang, Lin, …, Fang 2026, arXiv 2601.00583), full-model form.

Each client reports, per MoE layer, its router usage u_i(e) (mean router probability of e over its real tokens)
and router score s_i(e) = λ·mean + (1 − λ)·max over its training batches of the batch's mean probability.
With τ = ``usage_share`` / E:

    experts:  E_e ← Σ_i n_i·1(u_i(e) ≥ τ)·E_{i,e} / Σ_j n_j·1(u_j(e) ≥ τ)      (nobody above τ: unchanged)
    router:   p_i(e) = u_i(e)·s_i(e),  α_i = Σ_{e: u_i(e) ≥ τ} p_i(e) / |∪_j {e : u_j(e) ≥ τ}|,
              router ← Σ_i α_i·router_i   (``normalise``: divided by Σ_i α_i, our default; the paper does not)
    shared:   FedAvg.

HFedMoE's compute-budget expert selection is dropped: every client holds the full model. Clients deploy the
global model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fcmoe.algorithms.base import Algorithm, AlgorithmConfig, ClientRuntime, ClientUpdate, ServerResult
from fcmoe.core import WEIGHTED_MEAN, MeanRule, Tree, holder_weights
from fcmoe.registry import register_algorithm

if TYPE_CHECKING:  # a hint only: importing training would load transformers with every config
    from fcmoe.training.local import FeatureSet, LocalResult

SCORES = "router_scores/"  # client statistic per layer: [3, E] usage, mean and max batch score


@dataclass(frozen=True)
class HFedMoEConfig(AlgorithmConfig):
    """HFedMoE's aggregation switches.

    Attributes
    ----------
    usage_share
        τ·E: an expert counts for a client when its usage is at least this share of the uniform 1/E (0.5: half).
    score_mix
        λ in s = λ·mean + (1 − λ)·max of the batch router scores.
    normalise
        Divide the router weights α_i by Σ_i α_i (ours); False is the paper's literal Σ_i α_i·router_i.
    """

    usage_share: float = 0.5
    score_mix: float = 0.5
    normalise: bool = True

    def __post_init__(self) -> None:
        if not self.usage_share >= 0:
            raise ValueError(f"hfedmoe.usage_share = {self.usage_share}: must be >= 0 (τ = usage_share / E)")
        if not 0.0 <= self.score_mix <= 1.0:
            raise ValueError(f"hfedmoe.score_mix = {self.score_mix}: λ must be in [0, 1]")


@register_algorithm("hfedmoe")
class HFedMoE(Algorithm):
    """Usage-thresholded expert averaging and importance-weighted router aggregation."""

    display_name = "HFedMoE"
    metric_keys = frozenset({"usage_above_tau_share_per_layer", "router_weight_total_per_layer"})
    config_class = HFedMoEConfig
    config: HFedMoEConfig

    def client_statistics(self, runtime: ClientRuntime, client_state: dict[str, Any], trained: LocalResult,
                          data: FeatureSet) -> dict[str, torch.Tensor]:
        return {SCORES + layer: scores for layer, scores in trained.router_scores.items()}

    def _scores(self, update: ClientUpdate, layer: str) -> torch.Tensor:
        """``[3, E]`` (usage, mean, max) of ``update``; from its routing frequencies if it sent no scores."""
        scores = update.statistics.get(SCORES + layer)
        if scores is None:
            return update.frequencies(layer).float().expand(3, -1)
        return scores.to(torch.float64)

    def aggregate(self, global_state: Tree, updates: Sequence[ClientUpdate],
                  mean: MeanRule = WEIGHTED_MEAN) -> ServerResult:
        cfg, layout = self.config, self.layout
        state = dict(global_state)
        state.update(self.fedavg(global_state, updates, layout.shared_keys, mean))
        n = torch.tensor([u.num_samples for u in updates])
        above_share, alpha_total = {}, {}
        for layer in layout.layers:
            scores = torch.stack([self._scores(u, layer.name) for u in updates]).double()  # [N, 3, E]
            usage = scores[:, 0]  # [N, E]  u_i(e)
            above = usage >= cfg.usage_share / layer.num_experts  # [N, E]
            step = self.expert_means([u.delta for u in updates], layer, holder_weights(n, above), mean)  # [E, P]
            state = layout.scatter_experts(state, layer, layout.gather_experts(global_state, layer) + step)
            importance = usage * (cfg.score_mix * scores[:, 1] + (1 - cfg.score_mix) * scores[:, 2])  # p_i(e)
            union = int(above.any(dim=0).sum())
            alpha = (importance * above).sum(dim=1) / max(union, 1)  # [N]  α_i
            total = float(alpha.sum())
            if layer.router_keys and total > 0:
                router_deltas = torch.stack([layout.gather_router(u.delta, layer) for u in updates])  # [N, E, R]
                weights = (alpha / total)[:, None].expand(-1, layer.num_experts)  # [N, E]
                router = layout.gather_router(global_state, layer) + mean.per_expert(router_deltas, weights)
                state = layout.scatter_router(state, layer, router if cfg.normalise else total * router)
            above_share[layer.name] = above.double().mean().item()
            alpha_total[layer.name] = total
        return ServerResult(global_state=state, metrics={"usage_above_tau_share_per_layer": above_share,
                                                  "router_weight_total_per_layer": alpha_total})
