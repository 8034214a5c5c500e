"""What one federated round does on each side, written once for both engines (in-process and Flower).

Client i, round t:
    start_i = algo.client_start(θ_t, state_i)                    # FC-MoE: θ_t + λ r_i
    Δ_i     = local_train(start_i) − start_i                     # :func:`train_client`
server: θ_{t+1}, messages = algo.aggregate(θ_t, [Δ_i …])         # the algorithm's server half
client: algo.client_finish(state_i, θ_t, θ_{t+1}, message_i)     # :func:`finish_client` (FC-MoE: r_i ← ρ_i)
then each client's deployed model is scored on its own test split (:func:`local_accuracy`) and θ_{t+1} on the
global test set, and :func:`round_metrics` assembles the ``metrics.jsonl`` row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fcmoe.algorithms import Algorithm, ClientUpdate
from fcmoe.core import Tree, clip_factors, tree_norm, tree_num_bytes, tree_sub
from fcmoe.core.validate import update_problem
from fcmoe.models.layout import ExpertLayout
from fcmoe.training.local import FeatureSet, LocalTrainer, accuracy


def client_seed(seed: int, round_index: int, client_id: int) -> int:
    """A distinct, reproducible seed per (experiment seed, round, client): batch order and dropout."""
    return seed * 1_000_003 + round_index * 1_009 + client_id


def initial_client_state(seed: int, client_id: int) -> dict[str, Any]:
    """A client's private state before round 1 (PFL-MoE draws its head / gate split from ``seed``)."""
    return {"seed": seed * 1000 + client_id}


def train_client(algo: Algorithm, trainer: LocalTrainer, global_state: Tree, client_state: dict[str, Any],
                 data: FeatureSet, seed: int, round_index: int, client_id: int,
                 global_test: FeatureSet | None = None, sparse: bool = False) -> ClientUpdate:
    """The client half of a round up to the upload: re-anchor, train one local budget, measure Δ_i.

    With ``global_test`` the locally trained model (before aggregation) is also scored on it: DESIGN §2's second
    reading of local accuracy, reported as ``metrics["global_test_acc"]``. The engines ask for it in the final
    round only, on a stratified part of the global test set (``Experiment.probe_test``, 10 documents per class):
    10 clients × the whole set would cost about as much as the round's training.
    With ``sparse`` the experts that saw no token are left out of the upload (:func:`sparsify`).
    """
    start = algo.client_start(global_state, client_state)
    result = trainer.train(start, data, client_seed(seed, round_index, client_id))
    metrics = {"loss": result.loss}
    if global_test is not None:
        metrics["global_test_acc"] = global_accuracy(trainer, result.state, global_test)
        metrics["global_test_docs"] = len(global_test)
    update = ClientUpdate(client_id, tree_sub(result.state, start), len(data), result.routing_counts, metrics)
    update = sparsify(update, algo.layout) if sparse else update
    if algo.uses_expert_norms:  # [E] per layer, read on the client: the server then reads the updates once
        update.expert_norms = {layer.name: algo.layout.expert_norms([update.delta], layer)[0]
                               for layer in algo.layout.layers}
    return update


def sparsify(update: ClientUpdate, layout: ExpertLayout) -> ClientUpdate:
    """Mark ``update`` expert-sparse: what the wire carries (:meth:`ExpertLayout.pack_experts`) and nothing else.

    The in-process engine keeps the dense tree with the absent experts' rows set to zero (exactly what the Flower
    server unpacks), and records the bytes the packed upload takes.
    """
    held = {layer.name: update.routing_counts[layer.name] > 0 for layer in layout.layers}
    packed = dict(update.delta)
    for layer in layout.layers:
        packed = layout.pack_experts(packed, layer, held[layer.name])
    delta = packed
    for layer in layout.layers:
        delta = layout.unpack_experts(delta, layer, held[layer.name])
    return dataclasses.replace(update, delta=delta, sparse=True, upload_bytes=tree_num_bytes(packed))


def finish_client(algo: Algorithm, client_state: dict[str, Any], old_global: Tree, new_global: Tree,
                  message: Mapping[str, torch.Tensor] | None) -> None:
    """The client half after aggregation: update private state from the server's per-client message."""
    algo.client_finish(client_state, old_global, new_global, message)


def local_accuracy(algo: Algorithm, trainer: LocalTrainer, client_state: dict[str, Any], global_state: Tree,
                   train: FeatureSet, test: FeatureSet) -> float:
    """Accuracy of the client's deployed (personalised) model on its own test split."""
    logits = algo.personalised_logits(trainer, client_state, global_state, train, test)
    return accuracy(logits, test.labels)


def global_accuracy(trainer: LocalTrainer, global_state: Tree, test: FeatureSet) -> float:
    """Accuracy of the global model on the global held-out test set."""
    return accuracy(trainer.predict(global_state, test).logits, test.labels)


def expert_utilisation(updates: Sequence[ClientUpdate]) -> dict[str, list[float]]:
    """Per MoE layer, the share of all clients' (non-padding) tokens routed to each expert."""
    out = {}
    for layer in updates[0].routing_counts:
        total = torch.stack([u.routing_counts[layer] for u in updates]).sum(dim=0).to(torch.float64)  # [E]
        out[layer] = (total / total.sum().clamp_min(1.0)).tolist()
    return out


def client_utilisation(updates: Sequence[ClientUpdate]) -> dict[str, list[list[float]]]:
    """Per MoE layer, ``[clients][E]``: each client's share of its own tokens routed to each expert."""
    return {layer: [u.frequencies(layer).tolist() for u in updates] for layer in updates[0].routing_counts}


def upload_bytes(update: ClientUpdate) -> int:
    """Bytes a client uploads: Δ_i (only the held experts when sparse), its routing counts and n_i."""
    delta_bytes = tree_num_bytes(update.delta) if update.upload_bytes is None else update.upload_bytes
    return delta_bytes + tree_num_bytes(update.routing_counts) + 8


def round_metrics(method: str, round_index: int, updates: Sequence[ClientUpdate], global_acc: float,
                  local_acc: Sequence[float | None], model_bytes: int,
                  messages: Mapping[int, Mapping[str, torch.Tensor]], server_metrics: Mapping[str, Any],
                  wall_s: float) -> dict[str, Any]:
    """One ``metrics.jsonl`` row: accuracies, loss, utilisation, bytes up / down, wall time, the server's metrics.

    ``local_acc`` is ordered by client id; ``None`` marks a client that did not report (mean and std are over the
    others). ``updates`` may be empty (a round whose updates were all rejected).
    """
    reported = torch.tensor([a for a in local_acc if a is not None], dtype=torch.float64)
    nan = float("nan")
    row = {"global_acc": global_acc, "local_acc": list(local_acc),
           "local_acc_mean": reported.mean().item() if reported.numel() else nan,
           "local_acc_std": reported.std(unbiased=False).item() if reported.numel() else nan,
           "method": method, "round": round_index,
           "train_loss": sum(u.metrics["loss"] for u in updates) / len(updates) if updates else nan,
           "utilisation": expert_utilisation(updates) if updates else {},
           "clients": [u.client_id for u in updates],
           "client_utilisation": client_utilisation(updates) if updates else {},
           "bytes_up": sum(upload_bytes(u) for u in updates),
           "bytes_down": len(updates) * model_bytes + sum(tree_num_bytes(dict(m)) for m in messages.values()),
           "wall_s": wall_s, **server_metrics}
    local_models = [u.metrics["global_test_acc"] for u in updates if "global_test_acc" in u.metrics]
    if local_models:  # DESIGN §2's second reading: each local model (after its local epoch) on the global test set
        scores = torch.tensor(local_models, dtype=torch.float64)
        row.update(local_model_global_acc=local_models, local_model_global_acc_mean=scores.mean().item(),
                   local_model_global_acc_std=scores.std(unbiased=False).item(),
                   local_model_global_docs=int(updates[0].metrics.get("global_test_docs", 0)))
    return row


def participants(seed: int, round_index: int, num_clients: int, fraction: float) -> list[int]:
    """The clients drawn for a round: ``max(1, round(fraction · N))`` of them, seeded by (seed, round), sorted."""
    if fraction >= 1.0:
        return list(range(num_clients))
    count = max(1, round(fraction * num_clients))
    generator = torch.Generator().manual_seed(seed * 7_919 + round_index)
    return sorted(torch.randperm(num_clients, generator=generator)[:count].tolist())


def drops_out(seed: int, round_index: int, client_id: int, dropout: float) -> bool:
    """Whether a drawn client fails mid-round (its update never arrives); seeded per (seed, round, client)."""
    if dropout <= 0:
        return False
    generator = torch.Generator().manual_seed(client_seed(seed, round_index, client_id) + 104_729)
    return bool(torch.rand((), generator=generator) < dropout)


def round_draw(seed: int, round_index: int, num_clients: int, fraction: float, dropout: float,
               ) -> tuple[list[int], list[int]]:
    """(drawn, failed): the clients drawn for the round and those of them that fail mid-round."""
    drawn = participants(seed, round_index, num_clients, fraction)
    return drawn, [cid for cid in drawn if drops_out(seed, round_index, cid, dropout)]


def admit_updates(updates: Sequence[ClientUpdate], global_state: Tree, layout: ExpertLayout,
                  max_norm_ratio: float, clip: float) -> tuple[list[ClientUpdate], list[str]]:
    """The server's gate, both engines: :func:`screen_updates`, then :func:`clip_updates` on the accepted ones."""
    accepted, rejected = screen_updates(updates, global_state, layout, max_norm_ratio)
    return clip_updates(accepted, layout, clip), rejected


def screen_updates(updates: Sequence[ClientUpdate], global_state: Tree, layout: ExpertLayout,
                   max_norm_ratio: float) -> tuple[list[ClientUpdate], list[str]]:
    """Split the round's updates into accepted and rejected (with one-line reasons), before any aggregation.

    Rejected: a malformed update (:func:`fcmoe.core.validate.update_problem`: keys, shapes, dtypes, NaN / Inf,
    routing counts, n_i), and, with at least 3 well-formed updates and ``max_norm_ratio > 0``, one whose norm
    ‖Δ_i‖ exceeds ``max_norm_ratio`` × the median norm of the round (a scaled or exploding update).
    """
    layers = {spec.name: spec.num_experts for spec in layout.layers}
    accepted, rejected = [], []
    for update in updates:
        problem = update_problem(update.delta, global_state, update.routing_counts, layers, update.num_samples)
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
                     for u, norm, ok in zip(accepted, norms.tolist(), keep.tolist()) if not ok]
        accepted = [u for u, ok in zip(accepted, keep.tolist()) if ok]
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
    for layer in layout.layers:
        blocks = [layout.gather_experts(u.delta, layer) for u in updates]  # N × [E, P]
        factors = clip_factors(layout.expert_norms([u.delta for u in updates], layer).double(), multiple)  # [N, E]
        for i, block in enumerate(blocks):
            scaled = block * factors[i].to(block.dtype)[:, None]
            clipped[i].update({k: v.to(updates[i].delta[k].dtype)
                               for k, v in layout.split_experts(layer, scaled).items()})
    return [dataclasses.replace(u, delta=delta, expert_norms={}) for u, delta in zip(updates, clipped, strict=True)]


def attack(update: ClientUpdate, kind: str, factor: float) -> ClientUpdate:
    """Fault injection for robustness experiments: the upload scaled by ``factor`` ("scale") or negated
    ("signflip"), as a faulty or malicious client would send it."""
    scale = factor if kind == "scale" else -1.0
    return dataclasses.replace(update, delta={k: v * scale for k, v in update.delta.items()}, expert_norms={})
