"""Local training and evaluation on cached features (knows nothing about federation).

One :class:`LocalTrainer` wraps the single model instance of a process; every client's local epoch loads its
start tree into it, trains, and reads the end tree back out, so memory stays at one model plus the trees.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fcmoe.config_sections import ConfigError
from fcmoe.core import Tree
from fcmoe.models.classifier import EncoderClassifier
from fcmoe.models.layout import ExpertLayout
from fcmoe.models.outputs import Prediction
from fcmoe.models.precision import PrecisionPlan, check_device
from fcmoe.models.routing import RoutingRecorder, masked_routing
from fcmoe.training.config import TrainConfig
from fcmoe.training.sft import generation_scores, letter_accuracy, response_losses

log = logging.getLogger(__name__)


@dataclass
class FeatureSet:
    """What is cached of some documents: the frozen layers' output (fcmoe's upcycled encoder, ``[n, T, H]``) or the
    token ids (the hub families and the upcycled decoder, ``[n, T]``), right-padded.

    Instruction data (``task = "sft"``) also has the next-token ``targets`` (−100 off the response), whether each
    row's task is scored by exact match (else ROUGE-L), and its token ``ids`` when the features are hidden states;
    its labels are the tasks.
    """

    features: torch.Tensor  # [n, T, H] or [n, T]
    mask: torch.Tensor  # [n, T] 1 = real token
    labels: torch.Tensor  # [n]
    targets: torch.Tensor | None = None  # [n, T] sft: the token at t + 1 where it is a response token, else -100
    exact: torch.Tensor | None = None  # [n] bool, sft: scored by exact match (label words), else ROUGE-L
    ids: torch.Tensor | None = None  # [n, T] sft: the token ids, when the features are not they

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def token_ids(self) -> torch.Tensor:
        """``[n, T]`` token ids (the features themselves unless they are hidden states)."""
        return self.features if self.ids is None else self.ids

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name (what a feature cache file holds)."""
        return {name: value for name, value in vars(self).items() if value is not None}

    def subset(self, rows: torch.Tensor) -> FeatureSet:
        return FeatureSet(**{name: value[rows] for name, value in self.tensors().items()})

    @staticmethod
    def concat(parts: Sequence[FeatureSet]) -> FeatureSet:
        """The rows of ``parts`` one after another (views of one pool: the same fields and padded length)."""
        return FeatureSet(**{name: torch.cat([part.tensors()[name] for part in parts])
                             for name in parts[0].tensors()})

    def trimmed(self) -> FeatureSet:
        """The same documents padded only to their own longest: right padding past it is cut (nothing reads it)."""
        length = max(int(self.mask.sum(dim=1).max()), 1) if len(self) else self.mask.shape[1]
        return FeatureSet(**{name: value if name in ("labels", "exact") else value[:, :length]
                             for name, value in self.tensors().items()})


@dataclass
class LocalResult:
    """Outcome of one client's local training."""

    state: Tree  # trainable tree at the end
    routing_counts: dict[str, torch.Tensor]  # layer → [E] tokens routed, padding excluded
    loss: float  # mean training loss (cross-entropy + aux)
    steps: int
    router_scores: dict[str, torch.Tensor] = field(default_factory=dict)  # layer → [3, E] (RoutingRecorder)


def batch_rows(size: int, batch_size: int, epochs: int, steps: int,
               generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Row indices of each local batch: ``epochs`` shuffled passes over ``size`` rows, or, with ``steps > 0``,
    exactly ``steps`` batches from as many fresh shuffles as that takes (the last pass is cut short)."""
    if steps > 0:
        yield from itertools.islice(itertools.chain.from_iterable(
            torch.randperm(size, generator=generator).split(batch_size) for _ in itertools.count()), steps)
        return
    for _ in range(epochs):
        yield from torch.randperm(size, generator=generator).split(batch_size)


def featurize(model: EncoderClassifier, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
              batch_size: int = 64, bucketed: bool = False) -> FeatureSet:
    """Run the frozen bottom of ``model`` once over documents (``[n, T]`` ids) and keep the features (on the CPU).

    ``bucketed``: documents in length order, each batch run at its own longest length, and hidden-state features
    past a document's end zero (a causal decoder: right padding never changes a real position). Not for the
    upcycled encoder, whose balance loss reads the padding positions' features.
    """
    device = next(model.parameters()).device
    out = None  # filled batch by batch: the features are held once, never as a list of batches and their copy
    if not bucketed:
        for i in range(0, len(ids), batch_size):
            chunk = model.featurize(ids[i:i + batch_size].to(device), mask[i:i + batch_size].to(device)).cpu()
            if out is None:
                out = chunk.new_empty((len(ids), *chunk.shape[1:]))
            out[i:i + len(chunk)] = chunk
        return FeatureSet(out if out is not None else ids.clone(), mask.clone(), labels.clone())
    for rows in mask.sum(dim=1).argsort(stable=True).split(batch_size):
        length = max(int(mask[rows].sum(dim=1).max()), 1)
        chunk = model.featurize(ids[rows, :length].to(device), mask[rows, :length].to(device)).cpu()
        if chunk.dim() == 3:  # hidden states: zero past each document's end, whatever its batch
            chunk = chunk.masked_fill(~mask[rows, :length].bool()[:, :, None], 0.0)
        if out is None:
            out = chunk.new_zeros((len(ids), ids.shape[1], *chunk.shape[2:]))
        out[rows, :length] = chunk
    return FeatureSet(out if out is not None else ids.clone(), mask.clone(), labels.clone())


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a torch device: ``auto`` is the first CUDA GPU when one is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r} but torch sees no CUDA GPU (torch.cuda.is_available() is "
                          "False): set train.device = 'cpu' or 'auto'")
    return device


class LocalTrainer:
    """Trains and evaluates trainable trees on one model instance.

    Parameters
    ----------
    model
        The shared model; its trainable parameters are overwritten by every call.
    layout
        Its expert layout (router parameters get ``router_lr``; routing is recorded through it).
    config
        Optimiser and loss settings; ``config.device`` is where ``model`` is moved and every batch runs.
    precision
        The model's precision plan (:attr:`~fcmoe.models.build.BuiltModel.precision`): its compute dtype is the
        autocast dtype. ``None``: bf16 autocast when ``config.precision`` is "bf16", or "auto" with half-precision
        weights in the model; else none.
    router_defaults
        (router lr / lr, balance-loss weight) where ``config`` says -1 (auto):
        :attr:`~fcmoe.models.build.BuiltModel.router_defaults`; fcmoe's upcycled routers' by default.
    max_new_tokens
        A causal LM's generation budget per held-out prompt (``eval.max_new_tokens``).

    Features and trees live on the CPU; each batch and each start tree is copied to the device, and every result
    (end tree, routing counts, logits) comes back to the CPU, so the engines and the server never see a GPU tensor.
    """

    def __init__(self, model: EncoderClassifier, layout: ExpertLayout, config: TrainConfig,
                 precision: PrecisionPlan | None = None, router_defaults: tuple[float, float] = (10.0, 0.1),
                 max_new_tokens: int = 24) -> None:
        self.device = resolve_device(config.device)
        # train.router_lr / aux_loss_coef = -1: the model's own (BuiltModel.router_defaults)
        self.router_lr = config.router_lr if config.router_lr > 0 else router_defaults[0] * config.lr
        self.aux_loss_coef = config.aux_loss_coef if config.aux_loss_coef >= 0 else router_defaults[1]
        if precision is not None:
            check_device(precision, self.device)
            self.compute_dtype = precision.compute
        else:  # no plan: bf16 when asked, or when "auto" finds half-precision weights
            half = any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters())
            self.compute_dtype = (torch.bfloat16 if config.precision == "bf16" or config.precision == "auto" and half
                                  else torch.float32)
        self.model = model.to(self.device)
        self._loaded: Mapping[str, torch.Tensor] | None = None  # the tree the model holds, while untouched
        self.layout = layout
        self.config = config
        self.recorder = RoutingRecorder(model, layout)
        self.head_keys = model.head_keys
        self.max_new_tokens = max_new_tokens

    @property
    def device_name(self) -> str:
        """``cpu`` or the GPU's name (each method's ``summary.json`` entry: GPU and CPU results differ slightly)."""
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    def train(self, start: Mapping[str, torch.Tensor], data: FeatureSet, seed: int,
              expert_mask: Mapping[str, torch.Tensor] | None = None) -> LocalResult:
        """AdamW from ``start``: ``local_steps`` steps if set (cycling through ``data`` in fresh shuffles), else
        ``local_epochs`` epochs; the seed fixes batch order and dropout.

        ``expert_mask`` (layer → ``[E]``) restricts routing to a sub-MoE (:func:`~fcmoe.models.routing.masked_routing`).
        """
        cfg, model = self.config, self.model
        model.load_trainable_state(dict(start))
        self._loaded = None  # training changes the weights: the next predict loads its tree
        model.train()
        torch.manual_seed(seed)  # dropout
        generator = torch.Generator().manual_seed(seed)
        router_keys = set(self.layout.router_keys)
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        optimiser = torch.optim.AdamW(
            [{"params": [p for n, p in params if n not in router_keys], "lr": cfg.lr},
             {"params": [p for n, p in params if n in router_keys], "lr": self.router_lr}],
            weight_decay=cfg.weight_decay, fused=True)  # fused: 5x faster than the per-tensor loop on CPU
        self.recorder.reset()
        total, steps = torch.zeros((), device=self.device), 0  # summed on the device: no sync per step
        for rows in batch_rows(len(data), cfg.batch_size, cfg.local_epochs, cfg.local_steps, generator):
            batch = data.subset(rows)
            # token ids and instruction data: padded only to the batch's own longest document. Not the upcycled
            # encoder's cached features: the balance loss counts padding positions, so trimming would change results
            batch = batch.trimmed() if batch.features.dim() == 2 or batch.targets is not None else batch
            features, mask, labels = self._to_device(batch)
            targets = None if batch.targets is None else batch.targets.to(self.device)
            # the backward pass stays inside the mask: gradient checkpointing re-runs the routers there
            with masked_routing(model, self.layout, expert_mask):
                with self.autocast(), self.recorder.recording(model.routing_masks(mask, targets)):
                    if targets is None:
                        task_loss = nn.functional.cross_entropy(model(features, mask).float(), labels)  # [B, C]
                    else:  # the token-mean response loss of the batch (TRL's completion-only loss)
                        sums, counts = model.response_loss(features, mask, targets)
                        task_loss = sums.sum() / counts.sum().clamp_min(1)
                    balance = self.recorder.balance_loss()  # Switch load-balancing loss from the router logits
                loss = task_loss + self.aux_loss_coef * balance.float()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
            if cfg.max_grad_norm > 0:
                nn.utils.clip_grad_norm_([p for _, p in params], cfg.max_grad_norm)
            optimiser.step()
            total += loss.detach()
            steps += 1
        mean_loss = total.item() / max(steps, 1)
        if not math.isfinite(mean_loss):
            log.warning("local training produced a non-finite loss (%s)", mean_loss)
        return LocalResult(model.trainable_state(), self.recorder.snapshot(), mean_loss, steps,
                           self.recorder.router_scores())

    @torch.no_grad()
    def predict(self, state: Mapping[str, torch.Tensor], data: FeatureSet, batch_size: int = 128,
                expert_mask: Mapping[str, torch.Tensor] | None = None, record_routing: bool = False) -> Prediction:
        """Logits and pooled vectors of the model with trainable tree ``state`` on ``data`` (eval mode), routed
        within ``expert_mask`` if given; with ``record_routing`` also the routing counts (layer → ``[E]``).
        Instruction data (a causal LM): each row's response loss and generation score instead (empty logits)."""
        model = self.model
        self._load(state)
        model.eval()
        self.recorder.reset()
        if data.targets is not None:
            return self._predict_responses(data, batch_size, expert_mask, record_routing)
        pooled = []
        # length-bucketed: documents in length order, each batch padded only to its own longest
        order = data.mask.sum(dim=1).argsort(stable=True)  # [n]
        with self.autocast(), masked_routing(model, self.layout, expert_mask):
            for rows in order.split(batch_size):
                batch = data.subset(rows).trimmed()
                mask = batch.mask.to(self.device)
                with self.recorder.recording(mask) if record_routing else contextlib.nullcontext():
                    pooled.append(model.encode(batch.features.to(self.device), mask))  # [b, H]
            in_order = torch.cat(pooled)  # [n, H]
            pooled_all = torch.empty_like(in_order)
            pooled_all[order.to(self.device)] = in_order  # back to the documents' order
            logits = model.head(pooled_all)  # [n, C]
        return Prediction(logits=logits.float().cpu(), pooled=pooled_all.float().cpu(), labels=data.labels,
                          routing_counts=self.recorder.snapshot() if record_routing else {})

    def _predict_responses(self, data: FeatureSet, batch_size: int, expert_mask: Mapping[str, torch.Tensor] | None,
                           record_routing: bool) -> Prediction:
        """A causal LM on instruction data: each row's response loss and generation score (routing counted on the
        teacher-forced pass), in length-bucketed batches."""
        losses, scores = torch.zeros(len(data)), torch.zeros(len(data), dtype=torch.float64)
        order = data.mask.sum(dim=1).argsort(stable=True)  # [n]
        with self.autocast(), masked_routing(self.model, self.layout, expert_mask):
            for rows in order.split(batch_size):
                batch = data.subset(rows).trimmed()
                mask, targets = batch.mask.to(self.device), batch.targets.to(self.device)
                recording = (self.recorder.recording(self.model.routing_masks(mask, targets)) if record_routing
                             else contextlib.nullcontext())
                with recording:
                    losses[rows] = response_losses(self.model, batch.features.to(self.device), mask, targets).cpu()
                scores[rows] = generation_scores(self.model, batch.token_ids.to(self.device), mask, targets,
                                                 batch.exact, self.max_new_tokens)
        empty = torch.zeros(len(data), 0)
        return Prediction(logits=empty, pooled=empty, labels=data.labels, scores=scores, losses=losses,
                          routing_counts=self.recorder.snapshot() if record_routing else {})

    @torch.no_grad()
    def letter_accuracy(self, state: Mapping[str, torch.Tensor], data: FeatureSet, letter_ids: list[int],
                        batch_size: int = 64) -> float:
        """A causal LM with trainable tree ``state``: the share of ``data``'s questions (``labels``: the answer's
        index in ``letter_ids``) whose answer letter scores highest after the prompt (MMLU, zero-shot)."""
        self._load(state)
        self.model.eval()
        right = []
        with self.autocast():
            for rows in data.mask.sum(dim=1).argsort(stable=True).split(batch_size):
                batch = data.subset(rows).trimmed()
                right.append(letter_accuracy(self.model, batch.features.to(self.device), batch.mask.to(self.device),
                                             batch.labels, letter_ids))
        return torch.cat(right).mean().item() if right else float("nan")

    def _load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Put ``state`` into the model unless it holds it already (the clients scored on one global model load it
        once)."""
        if state is not self._loaded:
            self._loaded = None  # a load that fails half-way leaves no tree named
            self.model.load_trainable_state(dict(state))
            self._loaded = state

    def _to_device(self, batch: FeatureSet) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features, mask, labels) of ``batch`` on the training device."""
        return tuple(t.to(self.device, non_blocking=True) for t in (batch.features, batch.mask, batch.labels))

    def autocast(self) -> torch.autocast:
        """Autocast to the compute dtype when it is not fp32, else a no-op context."""
        return torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32)

