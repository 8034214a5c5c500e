"""The algorithm contract: a server half (aggregate) and a client half (start, finish, personalised prediction).

One object per method holds both halves; the engines (in-process ``fcmoe.sim`` and Flower ``fcmoe.fl``) drive it:

    start  = algo.client_start(global, client_state)              # client, before local training
    Δ_i    = local_train(start) − start                           # engine + fcmoe.training
    result = algo.aggregate(global, [ClientUpdate…])              # server
    algo.client_finish(client_state, global, result.state, result.messages[i])   # client, after the round
    logits = algo.personalised_logits(runtime, client_state, result.state, train_i, test_i)

Client state is a plain dict that never leaves the client (FC-MoE residual, PFL-MoE head and gate).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from fcmoe.core import ROBUST_AGGREGATORS, Tree, coordinate_aggregate, expert_weighted_mean, fedavg_step, holder_weights
from fcmoe.models.layout import ExpertLayout


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
    # MoE layer → [E] ‖Δ_{i,k}‖ as the client computed them (ExpertLayout.expert_norms): FC-MoE's importance needs
    # the norms before its one read of the updates, which then checks them ({}: the server computes them)
    expert_norms: dict[str, torch.Tensor] = field(default_factory=dict)

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

    state: Tree  # the new global trainable tree
    messages: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # per-client extras sent down
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prediction:
    """Model outputs on a dataset."""

    logits: torch.Tensor  # [n, C]
    pooled: torch.Tensor  # [n, H] sentence vectors before the head
    labels: torch.Tensor  # [n]


class ClientRuntime(Protocol):
    """What a client half may ask of the local model (implemented in ``fcmoe.training``)."""

    head_keys: tuple[str, str]

    def predict(self, state: Mapping[str, torch.Tensor], data: Any) -> Prediction: ...


class Algorithm:
    """Base class; subclasses set ``name`` and ``config_class`` and override the hooks they need.

    ``variants`` names config changes that a method list may ask for as ``"name/variant"`` (the paper's ablations,
    e.g. ``"fcmoe/no-projection"``), so the ablation runs in the same experiment as the full method: same data,
    partition and initial model.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[AlgorithmConfig]] = AlgorithmConfig
    variants: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    # clients send ‖Δ_{i,k}‖ per expert with their update (ClientUpdate.expert_norms; E floats per MoE layer)
    uses_expert_norms: ClassVar[bool] = False

    def __init__(self, config: AlgorithmConfig, layout: ExpertLayout) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{self.name} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.layout = layout
        self.inner = "mean"  # robust.aggregator: "mean" (the algorithm's weights) | "trimmed_mean" | "median"
        self.trim_fraction = 0.1
        self._workspace: torch.Tensor | None = None  # stack_experts' reused [E, N, P] buffer

    def set_inner_aggregator(self, kind: str, trim_fraction: float = 0.1) -> None:
        """Replace the weighted means over clients by a coordinate-wise robust statistic (``robust.aggregator``)."""
        if kind not in ("mean", *ROBUST_AGGREGATORS):
            raise ValueError(f"unknown aggregator {kind!r}; choose mean, {', '.join(ROBUST_AGGREGATORS)}")
        self.inner, self.trim_fraction = kind, trim_fraction

    def robust_mean(self, by_group: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """``[G, N, P]`` → ``[G, P]`` with the robust inner aggregator (only when ``inner`` is not "mean")."""
        return coordinate_aggregate(by_group, self.inner, self.trim_fraction, present)

    # ------------------------------------------------------------------ client half
    def client_start(self, global_state: Tree, client_state: dict[str, Any]) -> Tree:
        """Parameters local training starts from (default: the global model itself)."""
        return global_state

    def client_finish(self, client_state: dict[str, Any], old_global: Tree, new_global: Tree,
                      message: Mapping[str, torch.Tensor] | None) -> None:
        """Update private client state from the server's per-client message (default: nothing)."""

    def personalised_logits(self, runtime: ClientRuntime, client_state: dict[str, Any], global_state: Tree,
                            train: Any, test: Any) -> torch.Tensor:
        """Logits of the client's deployed model on its test split (default: the global model)."""
        return runtime.predict(global_state, test).logits

    # ------------------------------------------------------------------ server half
    def aggregate(self, global_state: Tree, updates: Sequence[ClientUpdate]) -> ServerResult:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers shared by subclasses
    def fedavg(self, global_state: Tree, updates: Sequence[ClientUpdate], keys: Sequence[str]) -> Tree:
        """FedAvg step on ``keys`` only.

        With sparse uploads an expert is averaged over the clients that uploaded it (n_i over its holders), since
        a client that did not route a token to it sent nothing, not a zero update.
        """
        deltas, sizes = [u.delta for u in updates], [u.num_samples for u in updates]
        sparse = any(u.sparse for u in updates)
        if not sparse and self.inner == "mean":
            return fedavg_step(global_state, deltas, sizes, keys)
        wanted = set(keys)
        expert_keys = set(self.layout.expert_keys) if sparse else set()
        plain = [k for k in keys if k not in expert_keys]
        if self.inner == "mean":
            out = fedavg_step(global_state, deltas, sizes, plain)
        else:  # coordinate-wise over clients, one key at a time: [1, N, numel]
            out = {k: global_state[k] + self.robust_mean(torch.stack([d[k].reshape(-1) for d in deltas])[None])
                   .reshape(global_state[k].shape).to(global_state[k].dtype) for k in plain}
        n = torch.tensor(sizes)
        for layer in self.layout.layers if sparse else ():
            if not wanted & set(layer.keys):
                continue
            held = torch.stack([u.held(layer.name) for u in updates])  # [N, E]
            deltas_by_expert = self.stack_experts(updates, layer)  # [N, E, P]
            step = (expert_weighted_mean(deltas_by_expert, holder_weights(n, held)) if self.inner == "mean"
                    else self.robust_mean(deltas_by_expert.transpose(0, 1), held.T))  # [E, P]
            moved = self.layout.add_to_experts(global_state, layer, step, torch.ones(layer.num_experts))
            out.update({k: moved[k] for k in layer.keys if k in wanted})
        return out

    def stack_experts(self, updates: Sequence[ClientUpdate], layer: Any) -> torch.Tensor:
        """Client expert updates of one MoE layer as ``[N, E, P]``: a transposed view of an expert-major buffer.

        The buffer is reused by the next call (the next layer, the next round): read the result before calling
        again. Holding one layer's N·E·P values between rounds saves the page faults of a fresh allocation.
        """
        self._workspace = self.layout.gather_experts_batched([u.delta for u in updates], layer, self._workspace)
        return self._workspace.transpose(0, 1)
