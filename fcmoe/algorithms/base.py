"""The algorithm contract: a server half (aggregate) and a client half (start, finish, personalised prediction).

One object per method holds both halves; the engines (in-process ``fcmoe.sim`` and Flower ``fcmoe.fl``) drive it:

    start  = algo.client_start(global, client_state)              # client, before local training
    mask   = algo.client_expert_mask(client_state)                # FedMoE: the client's sub-MoE, else None
    Δ_i    = local_train(start, mask) − start                     # engine + fcmoe.training
    update = algo.prepare_upload(client_state, update, trained)   # + client_statistics; local experts: no experts
    result = algo.aggregate(global, [ClientUpdate…])              # server
    algo.client_finish(client_state, global, result.global_state, result.messages[i])   # client, after the round
    scored = algo.personalised_prediction(runtime, client_state, result.global_state, train_i, test_i)

Client state is a plain dict that never leaves the client (FC-MoE residual, PFL-MoE head and gate, FedMoE mask,
local experts' own experts): trees of tensors or scalars.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from fcmoe.core import WEIGHTED_MEAN, MeanRule, Tree, fedavg_step, holder_weights
from fcmoe.models.layout import ExpertLayout, MoELayerSpec
from fcmoe.models.outputs import Prediction

if TYPE_CHECKING:  # a hint only: importing training would load transformers with every config
    from fcmoe.training.local import FeatureSet, LocalResult


@dataclass(frozen=True)
class AlgorithmConfig:
    """Base of every algorithm's frozen config; subclasses validate in ``__post_init__``."""


@dataclass
class ClientUpdate:
    """What a client uploads after local training."""

    client_id: int
    delta: Tree  # θ_end − θ_start over the trainable keys
    num_samples: int  # n_i
    routing_counts: dict[str, torch.Tensor]  # MoE layer → [E] tokens routed to each expert (padding excluded)
    metrics: dict[str, float] = field(default_factory=dict)
    sparse: bool = False  # experts that saw no token were not uploaded: absent (not zero) to the server
    upload_bytes: int | None = None  # Δ_i bytes as sent when sparse (None: dense, every tensor)
    statistics: dict[str, torch.Tensor] = field(default_factory=dict)  # algo.client_statistics (small tensors)

    def held(self, layer: str) -> torch.Tensor:
        """``[E]`` bool: the experts of ``layer`` this client uploaded (all unless the upload was sparse)."""
        counts = self.routing_counts[layer]
        return counts > 0 if self.sparse else torch.ones(counts.shape, dtype=torch.bool)

    def frequencies(self, layer: str) -> torch.Tensor:
        """f_{i,l,k} = tokens routed to k / tokens through layer l (zeros if the layer saw no token)."""
        return routing_frequencies(self.routing_counts[layer])


def routing_frequencies(counts: torch.Tensor) -> torch.Tensor:
    """Activation frequencies f_{·,k} = counts_k / Σ_j counts_j along the last dimension, in float64 (zeros where
    no token was routed): ``[E]`` for one client, ``[N, E]`` for a stack of them."""
    counts = counts.to(torch.float64)
    return counts / counts.sum(dim=-1, keepdim=True).clamp_min(1.0)


@dataclass
class ServerResult:
    """What the server half returns for one round."""

    global_state: Tree  # the new global trainable tree
    messages: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # per-client extras sent down
    metrics: dict[str, Any] = field(default_factory=dict)


class ClientRuntime(Protocol):
    """What a client half may ask of the local model (implemented in ``fcmoe.training``)."""

    head_keys: tuple[str, ...]  # the classification head's weight and bias (none for a causal LM)

    def predict(self, state: Mapping[str, torch.Tensor], data: FeatureSet, batch_size: int = 128,
                expert_mask: Mapping[str, torch.Tensor] | None = None, record_routing: bool = False,
                ) -> Prediction: ...


class Algorithm:
    """Base class; subclasses set ``name`` and ``config_class`` and override the hooks they need.

    ``variants`` names config changes that a method list may ask for as ``"name/variant"`` (the paper's ablations,
    e.g. ``"fcmoe/no-projection"``), so the ablation runs in the same experiment as the full method: same data,
    partition and initial model.
    """

    name: ClassVar[str] = ""
    # the keys of ServerResult.metrics, written into each round's metrics.jsonl row beside fcmoe.metrics_row's
    metric_keys: ClassVar[frozenset[str]] = frozenset()
    display_name: ClassVar[str] = ""  # in tables and figures; the registered name when empty
    # True: the report also gives the mean over clients of each deployed model on the global test set (PFL-MoE's
    # paper reading of "global accuracy"), measured in the final round
    scores_deployed_on_global_test: ClassVar[bool] = False
    config_class: ClassVar[type[AlgorithmConfig]] = AlgorithmConfig
    variants: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    def __init__(self, config: AlgorithmConfig, layout: ExpertLayout) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{self.name} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.layout = layout

    # ------------------------------------------------------------------ client half
    def client_start(self, global_state: Tree, client_state: dict[str, Any]) -> Tree:
        """Parameters local training starts from (default: the global model itself)."""
        return global_state

    def client_expert_mask(self, client_state: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """Layer → ``[E]`` (nonzero = held): the sub-MoE the client trains and deploys (default: every expert)."""
        return None

    def client_statistics(self, runtime: ClientRuntime, client_state: dict[str, Any], trained: LocalResult,
                          data: FeatureSet) -> dict[str, torch.Tensor]:
        """Small tensors uploaded beside Δ_i (``trained``: the local training's result, with ``state``,
        ``routing_counts`` and ``router_scores``; ``data``: the client's train split). Default: none."""
        return {}

    def prepare_upload(self, client_state: dict[str, Any], update: ClientUpdate, trained: Tree) -> ClientUpdate:
        """The update as it leaves the client (default: as measured); ``trained`` is the end of local training."""
        return update

    def upload_keys(self, global_state: Tree) -> list[str]:
        """The parameters a client's Δ_i holds (default: every trainable one); the server screens against them."""
        return list(global_state)

    def deployed_prediction(self, runtime: ClientRuntime, client_state: dict[str, Any], global_state: Tree,
                            data: FeatureSet) -> Prediction:
        """The client's deployed model as it stands (no local fitting) on ``data``; default the global model. Also
        read on the global test set for :attr:`scores_deployed_on_global_test`."""
        return runtime.predict(global_state, data)

    def client_finish(self, client_state: dict[str, Any], old_global: Tree, new_global: Tree,
                      message: Mapping[str, torch.Tensor] | None) -> None:
        """Update private client state from the server's per-client message (default: nothing)."""

    def personalised_prediction(self, runtime: ClientRuntime, client_state: dict[str, Any], global_state: Tree,
                                train: FeatureSet, test: FeatureSet) -> Prediction:
        """The client's deployed model on its test split: :meth:`deployed_prediction`, unless the method fits
        something locally first (PFL-MoE's head and gate)."""
        return self.deployed_prediction(runtime, client_state, global_state, test)

    # ------------------------------------------------------------------ server half
    def aggregate(self, global_state: Tree, updates: Sequence[ClientUpdate],
                  mean: MeanRule = WEIGHTED_MEAN) -> ServerResult:
        """The new global tree and per-client messages from this round's accepted ``updates``.

        Every mean over clients goes through ``mean``: the weighted mean as published, or a robust rule handed in
        by :class:`~fcmoe.algorithms.robust.RobustAggregation`.
        """
        raise NotImplementedError

    def server_state(self) -> Tree:
        """What the server half carries from one round to the next (FedAdam's moments), for checkpoints; the
        default algorithm carries nothing."""
        return {}

    def load_server_state(self, state: Tree) -> None:
        """Restore :meth:`server_state` (a resumed run)."""

    # ------------------------------------------------------------------ helpers shared by subclasses
    def fedavg(self, global_state: Tree, updates: Sequence[ClientUpdate], keys: Sequence[str],
               mean: MeanRule = WEIGHTED_MEAN) -> Tree:
        """FedAvg step on ``keys`` only.

        With sparse uploads an expert is averaged over the clients that uploaded it (n_i over its holders), since
        a client that did not route a token to it sent nothing, not a zero update.
        """
        deltas, sizes = [u.delta for u in updates], [u.num_samples for u in updates]
        sparse = any(u.sparse for u in updates)
        expert_keys = set(self.layout.expert_keys) if sparse else set()
        out = fedavg_step(global_state, deltas, sizes, [k for k in keys if k not in expert_keys], mean)
        n = torch.tensor(sizes)
        wanted = set(keys)
        for layer in self.layout.layers if sparse else ():
            if not wanted & set(layer.keys):
                continue
            held = torch.stack([u.held(layer.name) for u in updates])  # [N, E]
            step = self.expert_means(deltas, layer, holder_weights(n, held), mean)  # [E, P]
            moved = self.layout.add_to_experts(global_state, layer, step, torch.ones(layer.num_experts))
            out.update({k: moved[k] for k in layer.keys if k in wanted})
        return out

    def expert_means(self, trees: Sequence[Tree], layer: MoELayerSpec, weights: torch.Tensor,
                     mean: MeanRule) -> torch.Tensor:
        """``[E, P]``: row k is the ``mean`` of expert k over the trees with ``weights[:, k]`` (``weights [N, E]``),
        one expert unit at a time (:meth:`~fcmoe.models.layout.ExpertLayout.stack_expert`)."""
        rows, stack = [], None
        for k in range(layer.num_experts):
            stack = self.layout.stack_expert(trees, layer, k, stack)  # [N, P]
            rows.append(mean.over_rows(stack, weights[:, k]))  # [P]
        return torch.stack(rows)
