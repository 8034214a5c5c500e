"""FC-MoE (Lu et al. 2026, arXiv 2606.15625): conflict-aware federated fine-tuning of MoE models.

Client i, round t (the numbered steps of the paper's method section):

1. re-anchoring: train from θ + λ·r_i (r_i the cached residual, 0 at first); upload Δ_i measured from that start,
   the routing frequencies f_{i,l,k} and n_i. The residual itself never leaves the client.
2. server, importance per expert unit: c_{i,l,k} = f_{i,l,k}·‖Δ_{i,l,k}‖ (scheme "freq_norm"),
   w_{i,l,k} = c_{i,l,k} / Σ_j c_{j,l,k}; an expert nobody used keeps its value.
3. server, consensus projection per expert unit (``fcmoe.core.consensus``): g = Σ_i w_i Δ_i; clients with
   cos(Δ_i, g) < τ are projected, Δ̃_i = Δ_i − c_i g, ρ_i = c_i g.
4. server, aggregate: expert units θ ← θ + η Σ_i w_i Δ̃_i = θ + η·scale·g; shared and router parameters by FedAvg.
5. client, retention: r_i ← γ·r_i + ρ_i; the personalised model is θ + λ·r_i.

Communication (step 5): ρ_i = c_i·g and the global expert step is u = η·scale·g, so ρ_i = s_i·u with the scalar
s_i = c_i / (η·scale). The server sends one scalar per (client, MoE layer, expert); the client rebuilds ρ_i from
the model change it observes. scale = 1 − Σ_{conflicting} w_j c_j ≥ 1 because conflicting pairs have c_j < 0 when
τ ≤ 0, which is why τ is restricted to [−1, 0].
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fcmoe.algorithms.base import Algorithm, AlgorithmConfig, ClientUpdate, ServerResult, routing_frequencies
from fcmoe.core import (IMPORTANCE_SCHEMES, WEIGHTED_MEAN, ConsensusCoefficients, MeanRule, Tree,
                        consensus_coefficients, expert_norms, importance_weights, join_experts, normalise_columns,
                        pairwise_project, tree_add)
from fcmoe.models.outputs import Prediction
from fcmoe.registry import register_algorithm

RESIDUAL = "residual"
# Client i's residual at rest, per MoE layer (keys "<layer name><suffix>"; a layer where r_i = 0 has none):
#   STEP, SCALE:    r = scale[:, None] · step, step [E, P] the round's global expert step u (shared by the clients
#                   of a round) and scale [E] the client's s_i: consensus projection with γ = 0;
#   ROWS, EXPERTS:  r's nonzero rows [m, P] and which experts they are [m]: γ > 0, and pairwise projection (whose
#                   messages carry ρ_i the same way).
STEP, SCALE, ROWS, EXPERTS = "@step", "@scale", "@rows", "@experts"
RETAINED = "retained_norm/"  # client statistic per MoE layer: ‖λ r_i‖ of the residual it trained from (a scalar)
RHO = "rho/"  # pairwise messages: the removed part ρ_i itself, "rho/<layer>@rows" and "rho/<layer>@experts"
REFERENCES = ("consensus", "pairwise")


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
        λ, weight of the cached residual in the re-anchored start and the personalised model (0 = ablation
        "without retention").
    decay
        γ in r_i ← γ·r_i + ρ_i (0 replaces the residual each round).
    server_lr
        η, server step size on expert units.
    reference
        "consensus": project conflicting updates against the one consensus direction g (the paper);
        "pairwise": PCGrad between every pair of conflicting clients (FedGH-style ablation, ``fcmoe/pairwise``);
        the removed parts then travel down as tensors, not scalars.
    """

    importance: str = "freq_norm"
    projection: bool = True
    tau: float = 0.0
    retention: float = 0.5
    decay: float = 0.0
    server_lr: float = 1.0
    reference: str = "consensus"

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise ValueError(f"fcmoe.reference = {self.reference!r}: choose one of {', '.join(REFERENCES)}")
        if self.importance not in IMPORTANCE_SCHEMES:
            raise ValueError(f"fcmoe.importance = {self.importance!r}: choose one of {', '.join(IMPORTANCE_SCHEMES)}")
        if not -1.0 <= self.tau <= 0.0:
            raise ValueError(f"fcmoe.tau = {self.tau}: must be in [-1, 0] (the scalar residual message needs "
                             "conflicting pairs to have negative inner products)")
        if self.retention < 0:
            raise ValueError(f"fcmoe.retention = {self.retention}: λ must be >= 0 (0 disables retention)")
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"fcmoe.decay = {self.decay}: γ must be in [0, 1]")
        if not self.server_lr > 0:
            raise ValueError(f"fcmoe.server_lr = {self.server_lr}: η must be > 0 (default 1.0)")


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


def _ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, 0 when the denominator is 0 (nothing to compare with)."""
    return numerator / denominator if denominator > 0 else 0.0


def retention_ratio(retained: torch.Tensor, update_norms: torch.Tensor) -> float:
    """Mean over clients of ‖λ r_i‖ / ‖Δ_i‖ for one MoE layer (``[N]`` each; a client with Δ_i = 0 counts 0): how
    large the re-anchoring offset of step 1 is next to the update it produced."""
    ratios = torch.where(update_norms > 0, retained.double() / update_norms.double().clamp_min(1e-300), 0.0)
    return ratios.mean().item() if ratios.numel() else 0.0


def _residual_rows(stored: Mapping[str, torch.Tensor], layer: Any) -> torch.Tensor | None:
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


@register_algorithm("fcmoe")
class FCMoE(Algorithm):
    """Importance-weighted, conflict-projected expert aggregation with local retention of what was removed."""

    display_name = "FC-MoE"
    config_class = FCMoEConfig
    config: FCMoEConfig
    # the paper's Table II ablations, each one switch off
    variants = {"no-projection": {"projection": False}, "no-retention": {"retention": 0.0},
                "no-importance": {"importance": "size"}, "pairwise": {"reference": "pairwise"}}

    def __init__(self, config: FCMoEConfig, layout: Any) -> None:
        super().__init__(config, layout)
        # MoE layer → (weak references to the expert tensors of the last (θ_old, θ_new) pair, its step u)
        self._steps: dict[str, tuple[list[weakref.ref[torch.Tensor]], torch.Tensor]] = {}

    # ------------------------------------------------------------------ client half
    def client_start(self, global_state: Tree, client_state: dict[str, Any]) -> Tree:
        residual = self.residual(client_state) if self.config.retention else {}
        if not residual:
            return global_state
        return tree_add(global_state, residual, scale=self.config.retention)  # θ + λ r_i

    def residual(self, client_state: Mapping[str, Any]) -> Tree:
        """r_i as a tree of the expert keys of the layers where it is nonzero (``{}``: none), built from the
        compact form the client keeps (:data:`STEP` … :data:`EXPERTS`)."""
        stored = client_state.get(RESIDUAL) or {}
        out: Tree = {}
        for layer in self.layout.layers:
            rows = _residual_rows(stored, layer)
            if rows is not None:
                out.update(self.layout.split_experts(layer, rows))
        return out

    def client_statistics(self, runtime: Any, client_state: dict[str, Any], trained: Any,
                          data: Any) -> dict[str, torch.Tensor]:
        """‖λ r_i‖ per MoE layer of the residual this round started from, for the server's
        ``retention_ratio_per_layer`` (one scalar per layer; the residual itself stays on the client)."""
        stored = client_state.get(RESIDUAL)
        if not stored or self.config.retention == 0:
            return {}
        rows = {layer.name: _residual_rows(stored, layer) for layer in self.layout.layers}
        return {RETAINED + name: self.config.retention * torch.linalg.vector_norm(r.double()).float().reshape(1)
                for name, r in rows.items() if r is not None}

    def client_finish(self, client_state: dict[str, Any], old_global: Tree, new_global: Tree,
                      message: Mapping[str, torch.Tensor] | None) -> None:
        """r_i ← γ·r_i + ρ_i per expert unit: ρ_i = s_i·u from the per-expert scalars s_i and the round's global
        expert step u = θ_new − θ_old, or ρ_i itself (pairwise projection: the projected experts' rows).

        Kept compact: with γ = 0 (or no earlier residual) r_i is s_i and a reference to u, one tensor per round
        shared by every client of that round (:meth:`_global_step`); otherwise the rows of the experts where r_i is
        nonzero. A client with one conflicting expert stores one scalar, not a copy of the layer.
        """
        if not message:
            return
        old: Tree = client_state.get(RESIDUAL) or {}
        residual: Tree = {}
        for layer in self.layout.layers:
            before = _residual_rows(old, layer) if self.config.decay > 0 else None  # [E, P] γ's operand
            sent = message.get(RHO + layer.name + ROWS)
            if sent is not None:  # pairwise: ρ_i's rows of the experts this client was projected on
                rho = sent.new_zeros(layer.num_experts, layer.expert_numel)
                rho[message[RHO + layer.name + EXPERTS]] = sent
            else:
                scalars = message.get(layer.name)  # [E]; absent: no conflict in this layer (pairwise)
                if (scalars is None or not scalars.any()) and before is None:
                    continue  # no conflict in this layer: its residual is zero and not stored
                step = self._global_step(old_global, new_global, layer)  # [E, P]  u
                if before is None:  # r_i = ρ_i = s_i · u
                    residual.update({layer.name + SCALE: scalars.to(torch.float32), layer.name + STEP: step})
                    continue
                rho = (0.0 if scalars is None else scalars.to(torch.float32)[:, None]) * step  # ρ_i = s_i · u
            if before is not None:
                rho = rho + self.config.decay * before
            held = rho.ne(0).any(dim=1)  # [E]
            if held.any():
                residual.update({layer.name + ROWS: rho[held], layer.name + EXPERTS: held.nonzero().flatten()})
        if residual:
            client_state[RESIDUAL] = residual
        else:
            client_state.pop(RESIDUAL, None)

    def _global_step(self, old_global: Tree, new_global: Tree, layer: Any) -> torch.Tensor:
        """``[E, P]`` u = θ_new − θ_old of one MoE layer, computed once for a pair of global models: every client
        finishing the same round gets the same tensor (in-process, one copy for all of them). The pair is known by
        its expert tensors, held weakly, so a finished round's models are not kept alive here."""
        pair = [t for tree in (old_global, new_global) for t in (tree[k] for k in layer.keys)]
        memo = self._steps.get(layer.name)
        if memo is not None and len(memo[0]) == len(pair) and all(ref() is t for ref, t in zip(memo[0], pair)):
            return memo[1]
        step = self.layout.gather_experts(new_global, layer) - self.layout.gather_experts(old_global, layer)
        self._steps[layer.name] = ([weakref.ref(t) for t in pair], step)
        return step

    def deployed_prediction(self, runtime: Any, client_state: dict[str, Any], global_state: Tree,
                            data: Any) -> Prediction:
        """The personalised model θ + λ·r_i."""
        return runtime.predict(self.client_start(global_state, client_state), data)

    # ------------------------------------------------------------------ server half
    def _weighted_units(self, updates: Sequence[ClientUpdate], layer: Any,
                        n: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Step 2 of one MoE layer, one expert unit at a time: ``(Δ_k [N, P], ‖Δ_k‖ [N, 1], w_k [N, 1])`` per
        expert k. Δ_k is one buffer, refilled for the next expert: use it before asking for the next unit."""
        trees = [u.delta for u in updates]
        freqs = routing_frequencies(torch.stack([u.routing_counts[layer.name] for u in updates]))  # [N, E]
        held = torch.stack([u.held(layer.name) for u in updates])  # [N, E]; all True unless uploads are sparse
        stack = None
        for k in range(layer.num_experts):
            stack = self.layout.stack_expert(trees, layer, k, stack)  # [N, P]  Δ_{i,k}
            norms = expert_norms(stack[:, None, :])  # [N, 1]  ‖Δ_{i,k}‖
            w = importance_weights(self.config.importance, n, freqs[:, k:k + 1], norms)  # [N, 1]  w_{i,k}
            if not held[:, k].all():  # an expert a client did not upload is absent, not a zero update
                w = normalise_columns(w * held[:, k:k + 1]).to(w.dtype)
            yield stack, norms, w

    def _consensus(self, updates: Sequence[ClientUpdate], layer: Any, n: torch.Tensor,
                   mean: MeanRule) -> tuple[torch.Tensor, ConsensusCoefficients, torch.Tensor]:
        """Importance weights (step 2) and the consensus projection (step 3) of one MoE layer, one expert unit at a
        time: expert k's N client rows are one ``[N, 1, P]`` stack. Returns (weights [N, E], coefficients,
        ‖Δ_i‖ of the layer [N])."""
        tau = self.config.tau if self.config.projection else -1.0
        weights, per_expert, squares = [], [], torch.zeros(len(updates), dtype=torch.float64)
        for stack, norms, w in self._weighted_units(updates, layer, n):
            deltas = stack[:, None, :]  # [N, 1, P]  Δ_{i,k}
            g = mean.per_expert(deltas, w)  # [1, P]  g_k = Σ_i w_{i,k} Δ_{i,k} (or a robust mean of the Δ)
            per_expert.append(consensus_coefficients(deltas, w, tau, norms, g))
            weights.append(w)
            squares += norms[:, 0].double().square()
        return torch.cat(weights, dim=1), join_experts(per_expert), squares.sqrt()

    def _pairwise(self, updates: Sequence[ClientUpdate], layer: Any, n: torch.Tensor, mean: MeanRule, state: Tree,
                  messages: dict[int, dict[str, torch.Tensor]]) -> tuple[Tree, torch.Tensor, torch.Tensor,
                                                                        float, torch.Tensor]:
        """Steps 2–4 of one MoE layer with pairwise projection (``fcmoe/pairwise``): importance weights as in
        :meth:`_consensus`, Δ̃ by :func:`~fcmoe.core.pairwise_project` per expert unit,
        θ_k ← θ_k + η Σ_i w_{i,k} Δ̃_{i,k}, and each projected client's ρ_i = Δ_i − Δ̃_i added to its message.
        Returns (state, weights, conflicted, projection step change, ‖Δ_i‖ of the layer [N])."""
        cfg, layout = self.config, self.layout
        weights, steps, conflicted = [], [], []
        moved, plain, squares = 0.0, 0.0, torch.zeros(len(updates), dtype=torch.float64)
        removed: dict[int, dict[int, torch.Tensor]] = {}  # client index → expert k → ρ_{i,k} [P] (projected only)
        for k, (stack, norms, w) in enumerate(self._weighted_units(updates, layer, n)):
            # a client that did not upload expert k has a zero row: never in conflict, never projected
            projection = pairwise_project(stack) if cfg.projection else None
            projected = stack if projection is None else projection.projected  # [N, P]  Δ̃_{i,k}
            step = mean.per_expert(projected[:, None, :], w)[0]  # [P]
            unprojected = step
            if projection is not None and projection.conflicted.any():
                for i in projection.conflicted.nonzero().flatten().tolist():
                    removed.setdefault(i, {})[k] = (stack[i] - projected[i]).float()
                unprojected = mean.per_expert(stack[:, None, :], w)[0]  # [P]  the step without projection
            moved += (step - unprojected).double().square().sum().item()
            plain += unprojected.double().square().sum().item()
            squares += norms[:, 0].double().square()
            steps.append(step)
            conflicted.append(torch.zeros(len(updates), dtype=torch.bool) if projection is None
                              else projection.conflicted)
            weights.append(w)
        state = layout.add_to_experts(state, layer, torch.stack(steps), torch.full((layer.num_experts,),
                                                                                  cfg.server_lr))
        conflicted_pairs = torch.stack(conflicted, dim=1)  # [N, E]
        for i, rows in removed.items():
            messages[updates[i].client_id].update({RHO + layer.name + ROWS: torch.stack(list(rows.values())),
                                                   RHO + layer.name + EXPERTS: torch.tensor(list(rows))})
        return (state, torch.cat(weights, dim=1), conflicted_pairs, _ratio(moved, plain) ** 0.5,
                squares.sqrt())

    def aggregate(self, global_state: Tree, updates: Sequence[ClientUpdate],
                  mean: MeanRule = WEIGHTED_MEAN) -> ServerResult:
        cfg, layout = self.config, self.layout
        state = dict(global_state)
        state.update(self.fedavg(global_state, updates, [*layout.shared_keys, *layout.router_keys], mean))
        n = torch.tensor([u.num_samples for u in updates])
        messages: dict[int, dict[str, torch.Tensor]] = {u.client_id: {} for u in updates}
        conflict_rate, mean_cosine, projected_weight, step_change, retention = {}, {}, {}, {}, {}
        for layer in layout.layers:
            if cfg.reference == "pairwise":
                state, weights, conflicted, step_change[layer.name], update_norms = self._pairwise(
                    updates, layer, n, mean, state, messages)
                conflict_rate[layer.name], _, projected_weight[layer.name] = _layer_metrics(weights, conflicted)
            else:
                weights, coeffs, update_norms = self._consensus(updates, layer, n, mean)
                scale = coeffs.scale  # [E], >= 1 for tau <= 0
                # step 4: θ_k ← θ_k + η·scale_k·g_k; g_k = 0 for an unused expert, so it keeps its value
                state = layout.add_to_experts(state, layer, coeffs.consensus, cfg.server_lr * scale)
                scalars = coeffs.coefficient / (cfg.server_lr * scale)[None, :]  # [N, E]  ρ_i = s_i · step
                for update, row in zip(updates, scalars.to(torch.float32).unbind(0)):
                    messages[update.client_id][layer.name] = row
                conflict_rate[layer.name], mean_cosine[layer.name], projected_weight[layer.name] = \
                    _layer_metrics(weights, coeffs.conflicted, coeffs.cosine)
                # with projection the step is scale_k·g_k, without it g_k: ‖(scale − 1)·g‖ / ‖g‖ over the layer
                g_norms = torch.linalg.vector_norm(coeffs.consensus.double(), dim=-1)  # [E]
                step_change[layer.name] = _ratio(torch.linalg.vector_norm((scale.double() - 1) * g_norms).item(),
                                                 torch.linalg.vector_norm(g_norms).item())
            retained = torch.tensor([float(u.statistics.get(RETAINED + layer.name, torch.zeros(1))[0])
                                     for u in updates])  # [N]  ‖λ r_i‖, 0 without a residual
            retention[layer.name] = retention_ratio(retained, update_norms)
        total = sum(conflict_rate.values()) / max(len(conflict_rate), 1)
        return ServerResult(state=state, messages=messages,
                            metrics={"conflict_rate": total, "conflict_rate_per_layer": conflict_rate,
                                     "mean_cosine_per_layer": mean_cosine,
                                     "projected_weight_share_per_layer": projected_weight,
                                     "projection_step_change_per_layer": step_change,
                                     "retention_ratio_per_layer": retention})
