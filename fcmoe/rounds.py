"""What one federated round does on each side, written once for both engines (in-process and Flower).

Client i, round t (:func:`client_step`, then :func:`finish_client`):
    start_i = algo.client_start(θ_t, state_i)                    # FC-MoE: θ_t + λ r_i
    Δ_i     = local_train(start_i) − start_i                     # uploaded with the routing counts and n_i
    algo.client_finish(state_i, θ_t, θ_{t+1}, message_i)         # FC-MoE: r_i ← ρ_i
Server (:func:`server_step`): screen → clip → fewer than ``robust.min_clients`` accepted keeps θ_t →
    θ_{t+1}, messages = algo.aggregate(θ_t, [Δ_i …]) with the configured mean rule.
Then the deployed models of the :func:`scored_clients` are scored on their own test splits (:func:`local_accuracy`:
the round's participants before the last round, everyone in it) and θ_{t+1} on the
global test set, and :func:`round_metrics` assembles the ``metrics.jsonl`` row. Which clients take part, and which
of them fail mid-round, is :func:`start_round`'s: the server's decision in both engines.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fcmoe.algorithms import Algorithm, ClientUpdate, ServerResult
from fcmoe.algorithms.robust import RobustAggregation
from fcmoe.core import Tree, tree_num_bytes, tree_sub
from fcmoe.experiment import Experiment
from fcmoe.metrics_row import GLOBAL_ACC, LOCAL_ACC_MEAN, LOCAL_ACC_STD, MMLU_ACC, TASK_SCORES, TRAIN_LOSS, row_problem
from fcmoe.models.layout import ExpertLayout
from fcmoe.process_memory import release_freed_memory
from fcmoe.training.local import FeatureSet, LocalTrainer

log = logging.getLogger(__name__)


def client_seed(seed: int, round_index: int, client_id: int) -> int:
    """A distinct, reproducible seed per (experiment seed, round, client): batch order and dropout."""
    return seed * 1_000_003 + round_index * 1_009 + client_id


def initial_client_state(seed: int, client_id: int) -> dict[str, Any]:
    """A client's private state before round 1 (PFL-MoE draws its head / gate split from ``seed``)."""
    return {"seed": seed * 1000 + client_id}


def client_step(exp: Experiment, algo: Algorithm, client_id: int, round_index: int, global_state: Tree,
                client_state: dict[str, Any]) -> ClientUpdate:
    """The client half of a round up to the upload: re-anchor, train one local budget, measure Δ_i.

    In the final round the locally trained model (before aggregation) is also scored on ``exp.probe_test``, a
    stratified part of the global test set: DESIGN §2's second reading of local accuracy, reported as
    ``metrics["global_test_acc"]`` (the whole set, for every client, would cost about as much as the round's
    training). With ``sparse_uploads`` the experts that saw no token are left out (:func:`sparsify`); a client
    listed in ``attack.clients`` corrupts its upload (:func:`attack`, fault injection for experiments).
    """
    cfg, trainer = exp.config, exp.trainer
    start = algo.client_start(global_state, client_state)
    data = exp.client_train[client_id]
    result = trainer.train(start, data, client_seed(cfg.seed, round_index, client_id),
                           algo.client_expert_mask(client_state))
    metrics = {"loss": result.loss}
    if round_index == cfg.rounds:
        metrics["global_test_acc"] = global_accuracy(trainer, result.state, exp.probe_test)
        metrics["global_test_docs"] = len(exp.probe_test)
    update = ClientUpdate(client_id, tree_sub(result.state, start), len(data), result.routing_counts, metrics,
                          statistics=algo.client_statistics(trainer, client_state, result, data))
    update = algo.prepare_upload(client_state, update, result.state)
    update = sparsify(update, algo.layout) if cfg.sparse_uploads else update
    return attack(update, cfg.attack.kind, cfg.attack.factor) if client_id in cfg.attack.clients else update


def sparsify(update: ClientUpdate, layout: ExpertLayout) -> ClientUpdate:
    """Mark ``update`` expert-sparse: what the wire carries (:meth:`ExpertLayout.pack_experts`) and nothing else.

    The in-process engine keeps the dense tree with the absent experts' rows set to zero (exactly what the Flower
    server unpacks), and records the bytes the packed upload takes.
    """
    layers = [layer for layer in layout.layers if layout.holds_experts(update.delta, layer)]  # local experts: none
    held = {layer.name: update.routing_counts[layer.name] > 0 for layer in layers}
    packed = dict(update.delta)
    for layer in layers:
        packed = layout.pack_experts(packed, layer, held[layer.name])
    delta = packed
    for layer in layers:
        delta = layout.unpack_experts(delta, layer, held[layer.name])
    return dataclasses.replace(update, delta=delta, sparse=True, upload_bytes=tree_num_bytes(packed))


def finish_client(algo: Algorithm, client_state: dict[str, Any], old_global: Tree, new_global: Tree,
                  message: Mapping[str, torch.Tensor] | None) -> None:
    """The client half after aggregation: update private state from the server's per-client message."""
    algo.client_finish(client_state, old_global, new_global, message)


@dataclass
class ServerStep:
    """What the server made of one round's arrivals."""

    result: ServerResult  # the new global state, per-client messages and the algorithm's metrics
    accepted: list[ClientUpdate] = field(default_factory=list)  # aggregated, ordered by client id
    rejected: list[str] = field(default_factory=list)  # "client …: reason" / "node …: reason"
    skipped: bool = False  # too few accepted updates: the global model was kept


def server_step(server: RobustAggregation, global_state: Tree, arrived: Sequence[ClientUpdate],
                rejected: Sequence[str] = (), label: str = "") -> ServerStep:
    """The server half of a round: screen → clip → min-clients skip → aggregate → per-client messages.

    ``arrived`` may come in any order (Flower's replies do): they are aggregated by client id, so both engines
    form the same sums. ``rejected`` are reasons found before (a Flower reply that could not be decoded). Every
    rejection and a skipped round are logged, prefixed by ``label`` (e.g. "fcmoe round 3").
    """
    accepted, problems = server.admit(arrived, global_state)
    accepted.sort(key=lambda u: u.client_id)
    reasons = [*rejected, *problems]
    for reason in reasons:
        log.warning("%s: rejected %s", label, reason)
    if len(accepted) < server.config.min_clients:
        log.warning("%s: %d accepted update(s) < robust.min_clients = %d: global model kept", label, len(accepted),
                    server.config.min_clients)
        return ServerStep(ServerResult(global_state=global_state), [], reasons, skipped=True)
    result = server.aggregate(global_state, accepted)
    undeclared = sorted(set(result.metrics) - server.algorithm.metric_keys)
    if undeclared:  # a renamed or new key would otherwise vanish from the report without a word
        raise ValueError(f"{type(server.algorithm).__name__} returned undeclared metrics {undeclared}: add them to "
                         "its metric_keys")
    return ServerStep(result, accepted, reasons)


def local_accuracy(exp: Experiment, algo: Algorithm, client_id: int, client_state: dict[str, Any],
                   global_state: Tree) -> float:
    """Accuracy (instruction tuning: mean generation score) of the client's deployed (personalised) model on its own
    test split."""
    train, test = exp.client_train[client_id], exp.client_test[client_id]
    return algo.personalised_prediction(exp.trainer, client_state, global_state, train, test).score()


def deployed_global_accuracy(exp: Experiment, algo: Algorithm, client_state: dict[str, Any], global_state: Tree,
                             round_index: int) -> float | None:
    """The client's deployed model on the global test set, in the final round, for an algorithm whose paper reads
    "global accuracy" that way (:attr:`Algorithm.scores_deployed_on_global_test`, PFL-MoE); else ``None``."""
    if not algo.scores_deployed_on_global_test or round_index != exp.config.rounds:
        return None
    return algo.deployed_prediction(exp.trainer, client_state, global_state, exp.global_test).score()


def global_accuracy(trainer: LocalTrainer, global_state: Tree, test: FeatureSet) -> float:
    """Accuracy (instruction tuning: mean generation score) of the global model on ``test``."""
    return trainer.predict(global_state, test).score()


def global_scores(exp: Experiment, global_state: Tree, round_index: int) -> dict[str, Any]:
    """The global model on the global test set: ``global_acc`` (accuracy, or the mean generation score over held-out
    prompts); instruction tuning adds each task's score (``task_scores``), the mean response-token loss
    (``global_loss``) and, in the final round (and round 0), MMLU's zero-shot accuracy (``mmlu_acc``)."""
    seen = exp.trainer.predict(global_state, exp.global_test)
    scores: dict[str, Any] = {GLOBAL_ACC: seen.score()}
    if seen.scores is None:
        return scores
    names = exp.pool.label_names
    correct = seen.correct()
    scores[TASK_SCORES] = {names[t]: correct[seen.labels == t].mean().item() for t in seen.labels.unique().tolist()}
    scores["global_loss"] = seen.losses.double().mean().item()
    if exp.mmlu is not None and round_index in (0, exp.config.rounds):
        scores[MMLU_ACC] = exp.trainer.letter_accuracy(global_state, exp.mmlu, list(exp.letter_ids))
    return scores


def initial_scores(exp: Experiment) -> dict[str, Any]:
    """Round 0: the initial model on the global test set and on every client's test split (every method's
    deployed model before any round is this one), so curves start where training did. The clients' splits are
    scored in one pass over all of them: the cost of the documents, whatever their number of clients."""
    tests = exp.client_test
    every = exp.trainer.predict(exp.initial_state, FeatureSet.concat(tests))
    local = torch.tensor([part.score() for part in every.split([len(test) for test in tests])], dtype=torch.float64)
    return {**global_scores(exp, exp.initial_state, 0),
            LOCAL_ACC_MEAN: local.mean().item(), LOCAL_ACC_STD: local.std(unbiased=False).item()}


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
    """Bytes a client uploads: Δ_i (only the held experts when sparse), its routing counts, its statistics and n_i."""
    delta_bytes = tree_num_bytes(update.delta) if update.upload_bytes is None else update.upload_bytes
    return delta_bytes + tree_num_bytes(update.routing_counts) + tree_num_bytes(update.statistics) + 8


def round_metrics(method: str, round_index: int, step: ServerStep, draw: RoundDraw, scores: Mapping[str, Any],
                  local_acc: Sequence[float | None], model_bytes: int, wall_s: float,
                  eval_s: float = 0.0, deployed_global: Sequence[float] = ()) -> dict[str, Any]:
    """One ``metrics.jsonl`` row: accuracies, loss, utilisation, bytes up / down, who took part, wall time (of it,
    ``eval_s`` scoring the models), and the server's metrics.

    ``scores``: the global model's (:func:`global_scores`; ``{"global_acc": NaN}`` in a round that ``eval.every``
    does not score). ``local_acc`` is ordered by client id; ``None`` marks a client that did not report (mean and std
    are over the others; all ``None`` in a round that is not scored).
    ``step.accepted`` may be empty (a round whose updates were all rejected). ``deployed_global``: each client's
    deployed model on the global test set (:func:`deployed_global_accuracy`), when measured.
    """
    updates, messages = step.accepted, step.result.messages
    reported = torch.tensor([a for a in local_acc if a is not None], dtype=torch.float64)
    nan = float("nan")
    row = {**scores, "local_acc": list(local_acc),
           LOCAL_ACC_MEAN: reported.mean().item() if reported.numel() else nan,
           LOCAL_ACC_STD: reported.std(unbiased=False).item() if reported.numel() else nan,
           "method": method, "round": round_index,
           TRAIN_LOSS: sum(u.metrics["loss"] for u in updates) / len(updates) if updates else nan,
           "utilisation": expert_utilisation(updates) if updates else {},
           "clients": [u.client_id for u in updates],
           "client_utilisation": client_utilisation(updates) if updates else {},
           "bytes_up": sum(upload_bytes(u) for u in updates),
           "bytes_down": len(updates) * model_bytes + sum(tree_num_bytes(dict(m)) for m in messages.values()),
           "wall_s": wall_s, "eval_s": eval_s, **step.result.metrics}
    local_models = [u.metrics["global_test_acc"] for u in updates if "global_test_acc" in u.metrics]
    if local_models:  # DESIGN §2's second reading: each local model (after its local epoch) on the global test set
        scores = torch.tensor(local_models, dtype=torch.float64)
        row.update(local_model_global_acc=local_models, local_model_global_acc_mean=scores.mean().item(),
                   local_model_global_acc_std=scores.std(unbiased=False).item(),
                   local_model_global_docs=int(updates[0].metrics.get("global_test_docs", 0)))
    if deployed_global:  # PFL-MoE's paper reading of global accuracy: the mean over clients of their mixtures
        scores = torch.tensor(list(deployed_global), dtype=torch.float64)
        row.update(deployed_global_acc=list(deployed_global), deployed_global_acc_mean=scores.mean().item(),
                   deployed_global_acc_std=scores.std(unbiased=False).item())
    row.update(participants=draw.drawn, failed=draw.failed, rejected=step.rejected, skipped=step.skipped)
    problem = row_problem(row, step.result.metrics.keys())
    if problem is not None:
        raise ValueError(f"{method} round {round_index}: {problem}")
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


@dataclass(frozen=True)
class RoundDraw:
    """The clients drawn for a round and those of them that fail mid-round (``participation``)."""

    drawn: list[int]
    failed: list[int]

    @property
    def training(self) -> list[int]:
        """The drawn clients whose update will arrive: the only ones a round trains."""
        return [cid for cid in self.drawn if cid not in self.failed]


def start_round(exp: Experiment, round_index: int) -> RoundDraw:
    """Open a round, in both engines: the last round's freed memory goes back to the system, and the server draws
    who takes part (seeded by the experiment seed and the round)."""
    release_freed_memory()
    cfg = exp.config
    drawn = participants(cfg.seed, round_index, exp.num_clients, cfg.participation.fraction)
    return RoundDraw(drawn, [cid for cid in drawn if drops_out(cfg.seed, round_index, cid, cfg.participation.dropout)])


def scored_clients(exp: Experiment, round_index: int, draw: RoundDraw) -> list[int]:
    """The clients whose deployed model round ``round_index`` scores on their own test split (``eval.clients``),
    sorted: none in a round ``eval.every`` skips, every client in the last round, else the round's participants,
    everyone, or k clients drawn by (seed, round) — the same in both engines."""
    cfg, everyone = exp.config, list(range(exp.num_clients))
    chosen = cfg.eval.clients
    if not cfg.eval.scores(round_index, cfg.rounds):
        return []
    if round_index == cfg.rounds or chosen == "all":
        return everyone
    if chosen == "participants":
        return list(draw.drawn)
    generator = torch.Generator().manual_seed(cfg.seed * 7_919 + round_index + 15_485_863)
    return sorted(torch.randperm(exp.num_clients, generator=generator)[:int(chosen)].tolist())


def attack(update: ClientUpdate, kind: str, factor: float) -> ClientUpdate:
    """Fault injection for robustness experiments: the upload scaled by ``factor`` ("scale") or negated
    ("signflip"), as a faulty or malicious client would send it."""
    scale = factor if kind == "scale" else -1.0
    return dataclasses.replace(update, delta={k: v * scale for k, v in update.delta.items()})
