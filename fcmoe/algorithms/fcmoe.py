"""FC-MoE (Lu et al. 2026, arXiv 2606.15625): conflict-aware federated fine-tuning of MoE models.

Client i, round t (the numbered steps of the paper's method section):

1. re-anchoring: train from θ + λ·r_i (r_i the retained part, 0 at first); upload Δ_i measured from that start,
   the routing frequencies f_{i,l,k} and n_i. r_i itself never leaves the client.
2. server, importance per expert unit: importance score f_{i,l,k}·‖Δ_{i,l,k}‖ (scheme "freq_norm"), normalised
   over the clients into w_{i,l,k}; an expert nobody used keeps its value.
3. server, consensus projection per expert unit (:func:`~fcmoe.core.consensus_step`): g = Σ_i w_i Δ_i; clients
   with cos(Δ_i, g) < τ are projected, Δ̃_i = Δ_i − c_i g, and ρ_i = c_i g is what client i's update lost.
4. server, aggregate: expert units θ ← θ + η Σ_i w_i Δ̃_i = θ + η·scale·g; shared and router parameters by FedAvg.
5. client, retention: r_i ← γ·r_i + ρ_i; the personalised model is θ + λ·r_i.

Communication (step 5): ρ_i = c_i·g and the global expert step is u = η·scale·g, so ρ_i = s_i·u with the scalar
s_i = c_i / (η·scale). The server sends one scalar per (client, MoE layer, expert); the client rebuilds ρ_i from
the model change it observes. scale = 1 − Σ_{conflicting} w_j c_j ≥ 1 because conflicting pairs have c_j < 0 when
τ ≤ 0, which is why τ is restricted to [−1, 0]. The pairwise ablation (:func:`~fcmoe.core.pairwise_step`) sends
ρ_i itself, the rows of the experts it projected.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
from fcmoe.core import (
    IMPORTANCE_SCHEMES,
    WEIGHTED_MEAN,
    ExpertStep,
    MeanRule,
    Tree,
    consensus_step,
    expert_norms,
    importance_weights,
    normalise_columns,
    pairwise_step,
    tree_add,
)
from fcmoe.models.layout import ExpertLayout, MoELayerSpec
from fcmoe.models.outputs import Prediction
from fcmoe.registry import register_algorithm

if TYPE_CHECKING:  # a hint only: importing training would load transformers with every config
    from fcmoe.training.local import FeatureSet, LocalResult

RETAINED = "retained"  # client state: r_i, per MoE layer in a compact form (keys "<layer name><suffix>"):
#   STEP, SCALE:    r = scale[:, None] · step, step [E, P] the round's global expert step u (shared by the clients
#                   of a round) and scale [E] the client's s_i: consensus projection with γ = 0;
#   ROWS, EXPERTS:  r's nonzero rows [m, P] and which experts they are [m]: γ > 0, and pairwise projection (whose
#                   messages carry ρ_i the same way).
STEP, SCALE, ROWS, EXPERTS = "@step", "@scale", "@rows", "@experts"
OLDER_RETAINED = "residual"  # the client-state key of r_i in checkpoints written before it was named RETAINED
RETAINED_NORM = "retained_norm/"  # client statistic per MoE layer: ‖λ r_i‖ of the r_i it trained from (a scalar)
REMOVED = "removed/"  # pairwise messages: ρ_i itself, "removed/<layer>@rows" and "removed/<layer>@experts"
STEP_RULES = {"consensus": consensus_step, "pairwise": pairwise_step}  # fcmoe.reference → step 3 of one expert


@dataclass(frozen=True)
class FCMoEConfig(AlgorithmConfig):
    """FC-MoE switches; the defaults are the paper's.

    Attributes
    ----------
    importance
        Importance scheme for w_{i,l,k}: size | freq | norm | freq_norm | size_freq_norm. "size" = ablation
        "without importance weighting".
    projection
        Consensus projection on/off (off = ablation "without projection").
    tau
        Conflict threshold on cos(Δ_i, g), in [−1, 0].
    retention
        λ, weight of r_i in the re-anchored start and the personalised model (0 = ablation "without retention").
    decay
        γ in r_i ← γ·r_i + ρ_i (0 replaces r_i each round).
    server_lr
        η, server step size on expert units.
    reference
        "consensus": project conflicting updates against the one consensus direction g (the paper);
        "pairwise": PCGrad between every pair of conflicting clients (FedGH-style ablation, ``fcmoe/pairwise``);
        ρ_i then travels down as tensors, not scalars.
    """

    importance: str = "freq_norm"
    projection: bool = True
    tau: float = 0.0
    retention: float = 0.5
    decay: float = 0.0
    server_lr: float = 1.0
    reference: str = "consensus"

    def __post_init__(self) -> None:
        if self.reference not in STEP_RULES:
            raise ValueError(f"fcmoe.reference = {self.reference!r}: choose one of {', '.join(STEP_RULES)}")
        if self.importance not in IMPORTANCE_SCHEMES:
            raise ValueError(f"fcmoe.importance = {self.importance!r}: choose one of {', '.join(IMPORTANCE_SCHEMES)}")
        if not -1.0 <= self.tau <= 0.0:
            raise ValueError(f"fcmoe.tau = {self.tau}: must be in [-1, 0] (the scalar message of ρ_i needs "
                             "conflicting pairs to have negative inner products)")
        if self.retention < 0:
            raise ValueError(f"fcmoe.retention = {self.retention}: λ must be >= 0 (0 disables retention)")
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"fcmoe.decay = {self.decay}: γ must be in [0, 1]")
        if not self.server_lr > 0:
            raise ValueError(f"fcmoe.server_lr = {self.server_lr}: η must be > 0 (default 1.0)")


@dataclass(frozen=True)
class ExpertUnit:
    """What the server computed for one expert of one layer: its weights, the update norms, and its step."""

    weights: torch.Tensor  # [N] w_{i,k}
    norms: torch.Tensor  # [N] ‖Δ_{i,k}‖
    step: ExpertStep


@dataclass
class Diagnostics:
    """The server's figures per MoE layer: the conflict rate, the mean cosine to g, the importance weight the
    projected pairs carry, how far projection moved the step, and the re-anchoring offset next to the update."""

    rate: dict[str, float] = field(default_factory=dict)
    cosine: dict[str, float] = field(default_factory=dict)
    projected_weight: dict[str, float] = field(default_factory=dict)
    step_change: dict[str, float] = field(default_factory=dict)
    retention: dict[str, float] = field(default_factory=dict)

    def add(self, layer: MoELayerSpec, units: Sequence[ExpertUnit], updates: Sequence[ClientUpdate]) -> None:
        """One layer's figures, from its experts' steps."""
        weights = torch.stack([u.weights for u in units], dim=1)  # [N, E]
        conflicted = torch.stack([u.step.conflicted for u in units], dim=1)  # [N, E]
        cosine_rows = [u.step.cosine for u in units if u.step.cosine is not None]  # none with pairwise
        cosines = torch.stack(cosine_rows, dim=1) if cosine_rows else None
        self.rate[layer.name], mean_cosine, self.projected_weight[layer.name] = _layer_metrics(weights, conflicted,
                                                                                               cosines)
        if cosines is not None:
            self.cosine[layer.name] = mean_cosine
        self.step_change[layer.name] = _step_change([u.step for u in units])
        update_norms = torch.stack([u.norms for u in units], dim=1).double().square().sum(dim=1).sqrt()  # [N]
        retained = torch.tensor([float(u.statistics.get(RETAINED_NORM + layer.name, torch.zeros(1))[0])
                                 for u in updates])  # [N]  ‖λ r_i‖, 0 without r_i
        self.retention[layer.name] = retention_ratio(retained, update_norms)

    def metrics(self) -> dict[str, Any]:
        """The ``ServerResult.metrics`` of the round (FCMoE.metric_keys)."""
        return {"conflict_rate": sum(self.rate.values()) / max(len(self.rate), 1),
                "conflict_rate_per_layer": self.rate, "mean_cosine_per_layer": self.cosine,
                "projected_weight_share_per_layer": self.projected_weight,
                "projection_step_change_per_layer": self.step_change, "retention_ratio_per_layer": self.retention}


@register_algorithm("fcmoe")
class FCMoE(Algorithm):
    """Importance-weighted, conflict-projected expert aggregation with local retention of what was removed."""

    display_name = "FC-MoE"
    metric_keys = frozenset({"conflict_rate", "conflict_rate_per_layer", "mean_cosine_per_layer",
                             "projected_weight_share_per_layer", "projection_step_change_per_layer",
                             "retention_ratio_per_layer"})
    config_class = FCMoEConfig
    config: FCMoEConfig
    # the paper's Table II ablations, each one switch off
    variants = {"no-projection": {"projection": False}, "no-retention": {"retention": 0.0},
                "no-importance": {"importance": "size"}, "pairwise": {"reference": "pairwise"}}

    def __init__(self, config: FCMoEConfig, layout: ExpertLayout) -> None:
        super().__init__(config, layout)
        # MoE layer → (weak references to the expert tensors of the last (θ_old, θ_new) pair, its step u)
        self._steps: dict[str, tuple[list[weakref.ref[torch.Tensor]], torch.Tensor]] = {}

    # ------------------------------------------------------------------ server half: steps 2-4
    def aggregate(self, global_state: Tree, updates: Sequence[ClientUpdate],
                  mean: MeanRule = WEIGHTED_MEAN) -> ServerResult:
        cfg, layout = self.config, self.layout
        state = dict(global_state)
        state.update(self.fedavg(global_state, updates, [*layout.shared_keys, *layout.router_keys], mean))
        n = torch.tensor([u.num_samples for u in updates])  # [N]
        tau = cfg.tau if cfg.projection else None  # None: nothing is projected
        step_rule = STEP_RULES[cfg.reference]
        trees = [u.delta for u in updates]
        messages: dict[int, dict[str, torch.Tensor]] = {u.client_id: {} for u in updates}
        diagnostics = Diagnostics()
        for layer in layout.layers:
            f = routing_frequencies(torch.stack([u.routing_counts[layer.name] for u in updates]))  # [N, E]
            held = torch.stack([u.held(layer.name) for u in updates])  # [N, E]; all True unless uploads are sparse
            units, delta = [], None
            for k in range(layer.num_experts):
                delta = layout.stack_expert(trees, layer, k, delta)  # [N, P] Δ_{i,k}, one buffer refilled
                norms = expert_norms(delta)  # [N]
                w = importance_weights(cfg.importance, n, f[:, k], norms)  # [N]  step 2
                if not held[:, k].all():  # an expert a client did not upload is absent, not a zero update
                    w = normalise_columns(w * held[:, k])
                units.append(ExpertUnit(w, norms, step_rule(delta, w, tau, mean, norms)))  # step 3
            directions = torch.stack([u.step.direction for u in units])  # [E, P]
            scales = torch.stack([u.step.scale for u in units])  # [E]
            state = layout.add_to_experts(state, layer, directions, cfg.server_lr * scales)  # step 4
            self._add_messages(messages, updates, layer, units)
            diagnostics.add(layer, units, updates)  # then the layer's steps are let go
        return ServerResult(global_state=state, messages=messages, metrics=diagnostics.metrics())

    def _add_messages(self, messages: dict[int, dict[str, torch.Tensor]], updates: Sequence[ClientUpdate],
                      layer: MoELayerSpec, units: Sequence[ExpertUnit]) -> None:
        """What each client needs of ρ_i in one layer: its scalars s_i [E] ("<layer>"), or with pairwise projection
        the rows ρ_i of the experts it was projected on ("removed/<layer>@rows", "…@experts")."""
        if self.config.reference == "consensus":
            coefficients = torch.stack([u.step.removed for u in units], dim=1)  # [N, E]  c_i
            scales = torch.stack([u.step.scale for u in units])  # [E]
            scalars = coefficients / (self.config.server_lr * scales)[None, :]  # [N, E]  ρ_i = s_i · u
            for update, row in zip(updates, scalars.to(torch.float32).unbind(0), strict=True):
                messages[update.client_id][layer.name] = row
            return
        rows: dict[int, dict[int, torch.Tensor]] = {}  # client index → expert → ρ_{i,k} [P]
        for k, unit in enumerate(units):
            projected = unit.step.conflicted.nonzero().flatten().tolist()  # the m clients of step.removed
            for i, removed in zip(projected, unit.step.removed, strict=True):
                rows.setdefault(i, {})[k] = removed
        for i, by_expert in rows.items():
            messages[updates[i].client_id].update({
                REMOVED + layer.name + ROWS: torch.stack(list(by_expert.values())),  # [m, P]
                REMOVED + layer.name + EXPERTS: torch.tensor(list(by_expert))})  # [m]

    # ------------------------------------------------------------------ client half: steps 1 and 5
    def client_start(self, global_state: Tree, client_state: dict[str, Any]) -> Tree:
        retained = self.retained(client_state) if self.config.retention else {}
        if not retained:
            return global_state
        return tree_add(global_state, retained, scale=self.config.retention)  # θ + λ r_i

    def retained(self, client_state: Mapping[str, Any]) -> Tree:
        """r_i as a tree of the expert keys of the layers where it is nonzero (``{}``: none), built from the
        compact form the client keeps (:data:`STEP` … :data:`EXPERTS`)."""
        stored = _stored(client_state)
        out: Tree = {}
        for layer in self.layout.layers:
            rows = _retained_rows(stored, layer)
            if rows is not None:
                out.update(self.layout.split_experts(layer, rows))
        return out

    def client_statistics(self, runtime: ClientRuntime, client_state: dict[str, Any], trained: LocalResult,
                          data: FeatureSet) -> dict[str, torch.Tensor]:
        """‖λ r_i‖ per MoE layer of the r_i this round started from, for the server's ``retention_ratio_per_layer``
        (one scalar per layer; r_i itself stays on the client)."""
        stored = _stored(client_state)
        if not stored or self.config.retention == 0:
            return {}
        rows = {layer.name: _retained_rows(stored, layer) for layer in self.layout.layers}
        return {RETAINED_NORM + name: self.config.retention * torch.linalg.vector_norm(r.double()).float().reshape(1)
                for name, r in rows.items() if r is not None}

    def client_finish(self, client_state: dict[str, Any], old_global: Tree, new_global: Tree,
                      message: Mapping[str, torch.Tensor] | None) -> None:
        """r_i ← γ·r_i + ρ_i per expert unit: ρ_i = s_i·u from the per-expert scalars s_i and the round's global
        expert step u = θ_new − θ_old, or ρ_i itself (pairwise projection: the projected experts' rows).

        Kept compact: with γ = 0 (or no earlier r_i) r_i is s_i and a reference to u, one tensor per round shared by
        every client of that round (:meth:`_global_step`); otherwise the rows of the experts where r_i is nonzero.
        A client with one conflicting expert stores one scalar, not a copy of the layer.
        """
        if not message:
            return
        old = _stored(client_state)
        kept: Tree = {}
        for layer in self.layout.layers:
            before = _retained_rows(old, layer) if self.config.decay > 0 else None  # [E, P] γ's operand
            if self.config.reference == "pairwise":
                rows = message.get(REMOVED + layer.name + ROWS)  # absent: this client was projected on no expert
                if rows is None and before is None:
                    continue  # ρ_i = 0 and nothing retained: r_i is zero and not stored
                removed = torch.zeros(layer.num_experts, layer.expert_numel)  # [E, P]  ρ_i
                if rows is not None:
                    removed[message[REMOVED + layer.name + EXPERTS]] = rows
            else:
                scalars = message[layer.name].to(torch.float32)  # [E]  s_i
                if not scalars.any() and before is None:
                    continue  # no conflict in this layer: r_i is zero and not stored
                step = self._global_step(old_global, new_global, layer)  # [E, P]  u
                if before is None:  # r_i = ρ_i = s_i · u
                    kept.update({layer.name + SCALE: scalars, layer.name + STEP: step})
                    continue
                removed = scalars[:, None] * step  # ρ_i = s_i · u
            if before is not None:
                removed = removed + self.config.decay * before
            nonzero = removed.ne(0).any(dim=1)  # [E]
            if nonzero.any():
                kept.update({layer.name + ROWS: removed[nonzero], layer.name + EXPERTS: nonzero.nonzero().flatten()})
        client_state.pop(OLDER_RETAINED, None)
        if kept:
            client_state[RETAINED] = kept
        else:
            client_state.pop(RETAINED, None)

    def _global_step(self, old_global: Tree, new_global: Tree, layer: MoELayerSpec) -> torch.Tensor:
        """``[E, P]`` u = θ_new − θ_old of one MoE layer, computed once for a pair of global models: every client
        finishing the same round gets the same tensor (in-process, one copy for all of them). The pair is known by
        its expert tensors, held weakly, so a finished round's models are not kept alive here."""
        pair = [t for tree in (old_global, new_global) for t in (tree[k] for k in layer.keys)]
        memo = self._steps.get(layer.name)
        if memo is not None and len(memo[0]) == len(pair) and all(
                ref() is t for ref, t in zip(memo[0], pair, strict=True)):
            return memo[1]
        step = self.layout.gather_experts(new_global, layer) - self.layout.gather_experts(old_global, layer)
        self._steps[layer.name] = ([weakref.ref(t) for t in pair], step)
        return step

    def deployed_prediction(self, runtime: ClientRuntime, client_state: dict[str, Any], global_state: Tree,
                            data: FeatureSet) -> Prediction:
        """The personalised model θ + λ·r_i."""
        return runtime.predict(self.client_start(global_state, client_state), data)


def _stored(client_state: Mapping[str, Any]) -> Tree:
    """The compact r_i a client keeps (``{}``: none), under its key or an older checkpoint's."""
    return client_state.get(RETAINED) or client_state.get(OLDER_RETAINED) or {}


def _retained_rows(stored: Mapping[str, torch.Tensor], layer: MoELayerSpec) -> torch.Tensor | None:
    """``[E, P]`` r_i of one MoE layer from its compact form (``None``: zero, not stored)."""
    if layer.name + SCALE in stored:
        return stored[layer.name + SCALE][:, None] * stored[layer.name + STEP]
    rows = stored.get(layer.name + ROWS)
    if rows is None:
        return None if layer.keys[0] not in stored else torch.cat(  # dense, by expert key: an older checkpoint's
            [part.gather(stored) for part in layer.parts], dim=1)
    dense = rows.new_zeros(layer.num_experts, layer.expert_numel)
    dense[stored[layer.name + EXPERTS]] = rows
    return dense


def _layer_metrics(weights: torch.Tensor, conflicted: torch.Tensor,
                   cosine: torch.Tensor | None = None) -> tuple[float, float, float]:
    """One MoE layer's conflict rate and mean cosine (NaN without ``cosine``) over the (client, expert) pairs of
    the experts someone used, and the share of importance weight the projected pairs carry (how much projection
    can move the aggregate)."""
    used = weights.sum(dim=0) > 0  # [E]
    pairs = max(int(used.sum()) * weights.shape[0], 1)
    conflict_rate = conflicted[:, used].sum().item() / pairs
    mean_cosine = float("nan") if cosine is None else cosine[:, used].double().sum().item() / pairs
    projected_weight = (weights.double() * conflicted).sum().item() / max(weights.double().sum().item(), 1e-12)
    return conflict_rate, mean_cosine, projected_weight


def _step_change(steps: Sequence[ExpertStep]) -> float:
    """‖step − step without projection‖ / ‖step without projection‖ over one layer's experts (0 when nothing
    moved): with consensus projection ‖(scale − 1)·g‖ / ‖g‖."""
    moved = sum((s.scale.double() * s.direction.double() - s.unprojected.double()).square().sum().item()
                for s in steps)
    plain = sum(s.unprojected.double().square().sum().item() for s in steps)
    return (moved / plain) ** 0.5 if plain > 0 else 0.0


def retention_ratio(retained: torch.Tensor, update_norms: torch.Tensor) -> float:
    """Mean over clients of ‖λ r_i‖ / ‖Δ_i‖ for one MoE layer (``[N]`` each; a client with Δ_i = 0 counts 0): how
    large the re-anchoring offset of step 1 is next to the update it produced."""
    ratios = torch.where(update_norms > 0, retained.double() / update_norms.double().clamp_min(1e-300), 0.0)
    return ratios.mean().item() if ratios.numel() else 0.0
