"""FedMoE (Mei, Cai, Zhou, Wang, Xu 2024, arXiv 2408.11304): per-client sub-MoEs and modular aggregation.

Client i's first participation is stage 1: it trains the full model, then scores it (eval mode) on its own data:
activation frequencies p_{i,l,e} and accuracy. The server then gives it a sub-MoE: the largest threshold θ whose
per-layer "smallest expert set with Σ p ≥ θ" fits the budget ρ·L·E in all layers together (binary search on θ,
``fcmoe.core.submoe``). From then on (stage 2) the router logits of the experts outside its set are −∞ before
top-k, in training and in its deployed model. Aggregation is modular: shared parameters by FedAvg; expert (l, e)
and its router row over its holders H: |H| = 0 keeps it, |H| = 1 copies that client's, else the n-weighted mean.

Expert recommendation (a switch): a client whose accuracy has not improved for ``patience`` participations gets
the expert count of its K most similar clients (cosine of p), adding the unheld experts they use most or dropping
its least used; if its next participation is not better, the change is reverted and its structure frozen.

Our choices where the paper leaves room: p and the accuracy are measured on the client's train split after local
training (no extra held-out split, so FedMoE trains on the same documents as every other method; many clients
hold only 10–20 documents at α = 0.1); stage 1 is one participation; the budget rounds down and keeps one expert
per layer — k on a top-k model, whose router chooses k distinct experts per token (the fused families route
top-2 to top-8; their routers re-do their own choice with the mask, ``fcmoe.models.masked_routers``). The
variant ``fedmoe/agg`` (FedMoE-Agg) has no sub-models: its holders are the clients that routed at least one
token to the expert.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fcmoe.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    ClientRuntime,
    ClientUpdate,
    ServerResult,
    routing_frequencies,
)
from fcmoe.core import WEIGHTED_MEAN, MeanRule, Tree, holder_weights
from fcmoe.core.submoe import largest_threshold, recommend_experts
from fcmoe.models.layout import ExpertLayout, MoELayerSpec
from fcmoe.models.outputs import Prediction
from fcmoe.registry import register_algorithm

if TYPE_CHECKING:  # a hint only: importing training would load transformers with every config
    from fcmoe.training.local import FeatureSet, LocalResult

MASK = "fedmoe_mask"  # client state and server message: layer → [E] float, 1 = held
VAL_ACC, VAL_COUNTS = "val_acc", "val_counts/"  # client statistics


@dataclass(frozen=True)
class FedMoEConfig(AlgorithmConfig):
    """FedMoE's switches.

    Attributes
    ----------
    budget
        ρ: the share of all experts (every MoE layer together) a client's sub-MoE may hold (the paper's clients
        kept about 20 % of 384 experts).
    sub_models
        False = FedMoE-Agg: full models, holders are the clients that routed a token to the expert.
    recommend
        Expert recommendation with revert.
    patience, similar_clients
        P participations without improvement before a recommendation; K similar clients it follows.
    min_share
        FedMoE-Agg only: a holder must also have routed at least this share of its tokens in the layer to the
        expert (0: one token is enough, as published).
    """

    budget: float = 0.25
    sub_models: bool = True
    recommend: bool = True
    patience: int = 2
    similar_clients: int = 3
    min_share: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"fedmoe.budget = {self.budget}: the share of experts a client holds, in (0, 1], "
                             "e.g. 0.25")
        if self.patience < 1 or self.similar_clients < 1:
            raise ValueError(f"fedmoe.patience = {self.patience}, fedmoe.similar_clients = {self.similar_clients}: "
                             "both must be >= 1")
        if not 0.0 <= self.min_share < 1.0:
            raise ValueError(f"fedmoe.min_share = {self.min_share}: must be in [0, 1), e.g. 0.02")


@dataclass
class _Structure:
    """What the server keeps of one client: its sub-MoE, latest p, accuracy record and recommendation state."""

    mask: torch.Tensor  # [L, E] bool
    p: torch.Tensor  # [L, E] float64
    best: float  # best accuracy so far (NaN: none reported)
    stale: int = 0  # participations since the last improvement
    frozen: bool = False
    previous: torch.Tensor | None = None  # the mask before a recommendation on trial
    before: float = float("nan")  # the best accuracy when it went on trial: the next participation must beat it


@register_algorithm("fedmoe")
class FedMoE(Algorithm):
    """Sub-MoE per client, modular aggregation over holders, expert recommendation."""

    display_name = "FedMoE"
    metric_keys = frozenset({"mean_holders_per_expert", "experts_per_client", "expert_budget", "sub_moes_assigned",
                             "recommendations", "reverts"})
    config_class = FedMoEConfig
    config: FedMoEConfig
    variants = {"agg": {"sub_models": False, "recommend": False}}

    def __init__(self, config: FedMoEConfig, layout: ExpertLayout) -> None:
        super().__init__(config, layout)
        self.clients: dict[int, _Structure] = {}
        total = sum(layer.num_experts for layer in layout.layers)
        self.least = layout.top_k  # experts a sub-MoE holds per layer at least
        self.budget = max(self.least * len(layout.layers), int(config.budget * total))

    # ------------------------------------------------------------------ client half
    def client_expert_mask(self, client_state: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        return client_state.get(MASK)

    def client_statistics(self, runtime: ClientRuntime, client_state: dict[str, Any], trained: LocalResult,
                          data: FeatureSet) -> dict[str, torch.Tensor]:
        """p_{i,l,e} (as routing counts) and the accuracy of the trained sub-MoE on the client's own data."""
        if not self.config.sub_models:
            return {}
        seen = runtime.predict(trained.state, data, expert_mask=self.client_expert_mask(client_state),
                               record_routing=True)
        correct = seen.correct()  # [n] right or wrong (a causal LM: each response's generation score)
        return {VAL_ACC: correct.mean() if correct.numel() else torch.tensor(0.0, dtype=torch.float64),
                **{VAL_COUNTS + layer: counts for layer, counts in seen.routing_counts.items()}}

    def client_finish(self, client_state: dict[str, Any], old_global: Tree, new_global: Tree,
                      message: Mapping[str, torch.Tensor] | None) -> None:
        if message:
            client_state[MASK] = {layer.name: message[layer.name].clone() for layer in self.layout.layers}

    def deployed_prediction(self, runtime: ClientRuntime, client_state: dict[str, Any], global_state: Tree,
                            data: FeatureSet) -> Prediction:
        """The global model routed within the client's sub-MoE."""
        return runtime.predict(global_state, data, expert_mask=self.client_expert_mask(client_state))

    # ------------------------------------------------------------------ server half
    def _holders(self, update: ClientUpdate, index: int, layer: MoELayerSpec) -> torch.Tensor:
        """``[E]`` bool: the experts of ``layer`` that ``update`` contributes to the modular aggregation."""
        if not self.config.sub_models:
            return (update.routing_counts[layer.name] > 0) & (update.frequencies(layer.name) >= self.config.min_share)
        known = self.clients.get(update.client_id)
        held = update.held(layer.name)  # a sparse upload lacks the experts that saw no token
        return held if known is None else held & known.mask[index]

    def aggregate(self, global_state: Tree, updates: Sequence[ClientUpdate],
                  mean: MeanRule = WEIGHTED_MEAN) -> ServerResult:
        layout = self.layout
        state = dict(global_state)
        state.update(self.fedavg(global_state, updates, layout.shared_keys, mean))
        n = torch.tensor([u.num_samples for u in updates])
        held = []
        for index, layer in enumerate(layout.layers):
            holders = torch.stack([self._holders(u, index, layer) for u in updates])  # [N, E]
            weights = holder_weights(n, holders)  # [N, E]; an expert nobody holds gets a zero column: kept
            step = self.expert_means([u.delta for u in updates], layer, weights, mean)  # [E, P]
            state = layout.scatter_experts(state, layer, layout.gather_experts(global_state, layer) + step)
            if layer.router_keys:
                router_deltas = torch.stack([layout.gather_router(u.delta, layer) for u in updates])  # [N, E, R]
                router = layout.gather_router(global_state, layer) + mean.per_expert(router_deltas, weights)
                state = layout.scatter_router(state, layer, router)
            held.append(holders.sum(dim=0).float().mean().item())
        metrics: dict[str, Any] = {"mean_holders_per_expert": sum(held) / max(len(held), 1)}
        if not self.config.sub_models:
            return ServerResult(global_state=state, metrics=metrics)
        changes = self._restructure(updates)
        messages = {u.client_id: {layer.name: self.clients[u.client_id].mask[i].float()
                                  for i, layer in enumerate(layout.layers)} for u in updates}
        counts = [int(self.clients[u.client_id].mask.sum()) for u in updates]
        metrics.update(experts_per_client=sum(counts) / len(counts), expert_budget=self.budget, **changes)
        return ServerResult(global_state=state, messages=messages, metrics=metrics)

    def _frequencies(self, update: ClientUpdate) -> torch.Tensor:
        """``[L, E]`` p of ``update``: its own-data evaluation counts, or its training counts if it sent none."""
        rows = [update.statistics.get(VAL_COUNTS + layer.name, update.routing_counts[layer.name])
                for layer in self.layout.layers]
        return routing_frequencies(torch.stack(rows))

    def _restructure(self, updates: Sequence[ClientUpdate]) -> dict[str, int]:
        """Stage 1 for first-time clients, then the recommendation / revert bookkeeping; counts of each event."""
        events = {"sub_moes_assigned": 0, "recommendations": 0, "reverts": 0}
        for update in updates:
            p = self._frequencies(update)
            known = self.clients.get(update.client_id)
            acc = float(update.statistics[VAL_ACC]) if VAL_ACC in update.statistics else float("nan")
            if known is None:
                self.clients[update.client_id] = _Structure(largest_threshold(p, self.budget, self.least)[1], p, acc)
                events["sub_moes_assigned"] += 1
                continue
            known.p = p
            if known.previous is not None:  # a recommendation was on trial this participation
                if not acc > known.before:
                    known.mask, known.frozen = known.previous, True
                    events["reverts"] += 1
                known.previous = None
            if acc > known.best or math.isnan(known.best):
                known.best, known.stale = acc, 0
            else:
                known.stale += 1
        if not self.config.recommend:
            return events
        for update in updates:
            known = self.clients[update.client_id]
            if known.frozen or known.previous is not None or known.stale < self.config.patience:
                continue
            others = [c for cid, c in sorted(self.clients.items()) if cid != update.client_id]
            new = recommend_experts(known.mask, known.p, torch.stack([c.p for c in others]) if others
                                    else torch.zeros(0, *known.p.shape),
                                    torch.tensor([int(c.mask.sum()) for c in others]), self.config.similar_clients,
                                    self.least)
            known.stale = 0
            if not torch.equal(new, known.mask):
                known.previous, known.before, known.mask = known.mask, known.best, new
                events["recommendations"] += 1
        return events

    def server_state(self) -> Tree:
        out: Tree = {}
        for cid, c in self.clients.items():
            out[f"mask/{cid}"] = c.mask.to(torch.uint8)
            out[f"p/{cid}"] = c.p
            out[f"record/{cid}"] = torch.tensor([c.best, c.stale, float(c.frozen), c.before], dtype=torch.float64)
            if c.previous is not None:
                out[f"previous/{cid}"] = c.previous.to(torch.uint8)
        return out

    def load_server_state(self, state: Tree) -> None:
        self.clients = {}
        for key in (k for k in state if k.startswith("mask/")):
            cid = int(key.removeprefix("mask/"))
            best, stale, frozen, before = state[f"record/{cid}"].tolist()
            previous = state.get(f"previous/{cid}")
            self.clients[cid] = _Structure(state[key].bool(), state[f"p/{cid}"], best, int(stale), bool(frozen),
                                           None if previous is None else previous.bool(), before)
