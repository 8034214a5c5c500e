"""The sections of an experiment about how it trains and how the federation runs: local training, robustness,
participation, attacks, evaluation, tracking, sweeps.

Split from :mod:`fcmoe.config` (which holds data, partition, model, training and the experiment itself); the same
rules apply: frozen dataclasses, validated on construction, one-line :class:`ConfigError` naming key, value, fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key and the fix."""


def _positive(key: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{key} = {value}: must be >= 1")


@dataclass(frozen=True)
class RobustConfig:
    """What the server accepts and how it combines updates (both engines).

    Attributes
    ----------
    max_norm_ratio
        Reject an update whose norm exceeds this multiple of the round's median update norm (with ≥ 3 valid
        updates; 0 = off). Malformed updates (missing or extra keys, wrong shapes or dtypes, NaN / Inf) are always
        rejected.
    min_clients
        Fewer accepted updates than this keep the global model; the round is marked skipped.
    clip
        Clip each client's update per unit (every MoE expert, and all other parameters together) to this multiple
        of the round's median norm of that unit (0 = off).
    aggregator
        Inner aggregator over clients: "mean" (each algorithm's own weights), or coordinate-wise "trimmed_mean" /
        "median" (unweighted, over the clients holding the unit).
    trim_fraction
        trimmed_mean: the share of clients cut at each end of every coordinate.
    """

    max_norm_ratio: float = 10.0
    min_clients: int = 1
    clip: float = 0.0
    aggregator: str = "mean"
    trim_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not self.max_norm_ratio >= 0 or 0 < self.max_norm_ratio <= 1:
            raise ConfigError(f"robust.max_norm_ratio = {self.max_norm_ratio}: must be > 1 (e.g. 10) or 0 (off)")
        _positive("robust.min_clients", self.min_clients)
        if not self.clip >= 0:
            raise ConfigError(f"robust.clip = {self.clip}: must be >= 0 (a multiple of the median norm; 0 = off)")
        if self.aggregator not in AGGREGATORS:
            raise ConfigError(f"robust.aggregator = {self.aggregator!r}: choose one of {', '.join(AGGREGATORS)}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"robust.trim_fraction = {self.trim_fraction}: must be in [0, 0.5)")


AGGREGATORS = ("mean", "trimmed_mean", "median")


@dataclass(frozen=True)
class ParticipationConfig:
    """Which clients take part in a round (seeded by the experiment seed and the round).

    Attributes
    ----------
    fraction
        Share of the clients drawn each round (at least one).
    dropout
        Probability that a drawn client fails mid-round: it trains, then its update never arrives.
    """

    fraction: float = 1.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"participation.fraction = {self.fraction}: must be in (0, 1]")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"participation.dropout = {self.dropout}: must be in [0, 1)")


@dataclass(frozen=True)
class ServerConfig:
    """The server's host memory (both engines).

    Attributes
    ----------
    memory_budget
        Bytes of a round's client updates the server holds in memory, e.g. "8GiB", "500MB" ("" = no limit, the
        default; "0" = none at all). An update that would go beyond it is written to disk as it arrives and read
        back one tensor, or one expert, at a time (:mod:`fcmoe.spill`): the same result, more disk traffic.
        ``robust.clip > 0`` is not bounded by it (its clipped updates are held in memory).
    """

    memory_budget: str = ""

    def __post_init__(self) -> None:
        if self.memory_budget:
            budget_bytes(self.memory_budget)

    @property
    def budget(self) -> int | None:
        """:attr:`memory_budget` in bytes (``None``: no limit)."""
        return budget_bytes(self.memory_budget) if self.memory_budget else None


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def budget_bytes(text: str) -> int:
    """``"8GiB"`` → 8 · 2³⁰: a number (a decimal point allowed) and a unit of B, KB … TB or KiB … TiB."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise ConfigError(f"server.memory_budget = {text!r}: give a size such as \"8GiB\", \"500MB\" or \"0\" "
                          "(units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB; \"\" = no limit)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


@dataclass(frozen=True)
class AttackConfig:
    """Fault injection for robustness experiments: these clients send a corrupted update every round.

    Attributes
    ----------
    kind
        "none", "scale" (Δ_i × ``factor``) or "signflip" (−Δ_i).
    clients
        Client ids that misbehave.
    factor
        The scale of "scale" (default 100).
    """

    kind: str = "none"
    clients: tuple[int, ...] = ()
    factor: float = 100.0

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise ConfigError(f"attack.kind = {self.kind!r}: choose one of {', '.join(ATTACKS)}")
        if self.kind != "none" and not self.clients:
            raise ConfigError(f"attack.kind = {self.kind!r} needs attack.clients, e.g. clients = [0]")


ATTACKS = ("none", "scale", "signflip")


@dataclass(frozen=True)
class EvalConfig:
    """How often the models are scored (both engines).

    Attributes
    ----------
    every
        Score the global and every deployed local model every k-th round, and always in the last one (default 1:
        every round). Evaluation is most of what a round costs besides training; the rows of the rounds in between
        carry no accuracy (NaN / null) and the curves join the scored rounds. PFL-MoE fits its personal head and
        gate when its deployed model is scored, so with k > 1 it gets those extra epochs in scored rounds only.
    max_new_tokens
        ``task = "sft"``: the greedy continuation scored per held-out prompt is at most this many tokens.
    mmlu_questions
        ``task = "sft"``: MMLU knowledge retention, zero-shot, on this many of MMLU's test questions (a fixed
        subset stratified by subject), for the model before training and each method's final global model
        (0 = off).
    clients
        Whose deployed model is scored in a scored round before the last: ``"participants"`` (the default: the
        clients drawn for the round), ``"all"``, or a number k (a sample of k clients, seeded by the experiment
        seed and the round). The last round scores every client. With every client taking part each round (the
        default ``participation.fraction = 1``) the three agree; with a few of many clients drawn, scoring all of
        them would cost more than the round's training. Each row says whom it scored (``scored_clients``).
    """

    every: int = 1
    max_new_tokens: int = 24
    mmlu_questions: int = 200
    clients: int | str = "participants"

    def __post_init__(self) -> None:
        _positive("eval.every", self.every)
        if self.clients not in EVAL_CLIENTS and not (type(self.clients) is int and self.clients > 0):
            raise ConfigError(f"eval.clients = {self.clients!r}: choose \"participants\", \"all\" or a number of "
                              "clients to sample (e.g. eval.clients = 100)")
        _positive("eval.max_new_tokens", self.max_new_tokens)
        if self.mmlu_questions < 0:
            raise ConfigError(f"eval.mmlu_questions = {self.mmlu_questions}: must be >= 0 (0 = no MMLU score)")

    def scores(self, round_index: int, rounds: int) -> bool:
        """Whether ``round_index`` of ``rounds`` is scored."""
        return round_index == rounds or round_index % self.every == 0


EVAL_CLIENTS = ("participants", "all")


TRACKING_BACKENDS = ("none", "tensorboard")


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking beside ``metrics.jsonl`` (``fcmoe run`` and sweeps, both engines).

    Attributes
    ----------
    backend
        "none", or "tensorboard": every number of every ``metrics.jsonl`` row as a TensorBoard scalar, one run per
        method under ``<run folder>/tensorboard/`` (``tensorboard --logdir <run folder>/tensorboard``); per-layer
        and per-client values are tagged ``<metric>/<layer or client>``. Needs the ``tensorboard`` package
        (``pip install fcmoe[tracking]``).
    """

    backend: str = "none"

    def __post_init__(self) -> None:
        if self.backend not in TRACKING_BACKENDS:
            raise ConfigError(f"tracking.backend = {self.backend!r}: choose one of {', '.join(TRACKING_BACKENDS)}")


@dataclass(frozen=True)
class SweepConfig:
    """The grid ``fcmoe sweep`` runs when no ``--alphas`` / ``--seeds`` is given (``fcmoe run`` ignores it)."""

    alphas: tuple[float, ...] = ()  # Dirichlet α values; empty = the partition's own
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        for alpha in self.alphas:
            if not alpha > 0:
                raise ConfigError(f"sweep.alphas: α = {alpha} must be > 0 (e.g. alphas = [0.1, 0.5, 1.0])")
        if not self.seeds:
            raise ConfigError("sweep.seeds is empty: list at least one seed, e.g. seeds = [0, 1, 2]")


@dataclass(frozen=True)
class TrainConfig:
    """Local training, identical for every method."""

    local_epochs: int = 1
    # a fixed number of optimizer steps per round, cycling through the client's data in fresh shuffles (0 = use
    # local_epochs): the drift of a client's update then does not depend on how much data it holds
    local_steps: int = 0
    batch_size: int = 16
    lr: float = 1e-4
    # -1 = auto: 10 × lr for fcmoe's freshly upcycled routers, lr for a pretrained family's own (fcmoe.models.build)
    router_lr: float = -1.0
    weight_decay: float = 0.01
    # Switch load-balancing loss weight, summed over MoE layers; -1 = auto: 0.1 for fcmoe's upcycled routers, a
    # pretrained family's own coefficient in fcmoe's terms (coef · k / MoE layers: fcmoe.models.families)
    aux_loss_coef: float = -1.0
    max_grad_norm: float = 1.0
    # Where local training runs: auto = the first CUDA GPU when one is visible, else the CPU. Trees, aggregation and
    # evaluation outputs stay on the CPU either way (a client's tree of the default is ~75 MB: ~10 ms each way).
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto = the checkpoint's: bf16 compute for a bf16 / fp16 checkpoint, fp32 for an fp32 one; fp32 | bf16 to choose
    # (fcmoe.models.precision: what each weight is kept in). The exchanged trees are fp32 whatever this says
    precision: str = "auto"  # auto | fp32 | bf16
    # Flower's simulation: the share of a GPU each client's Ray actor asks for (-1 = one GPU when train.device is a
    # GPU, else none; an actor given none trains on the CPU)
    client_gpus: float = -1.0
    # under bf16 compute, keep fp32 master copies of the trainable weights (off: pure bf16, half their memory)
    master_weights: bool = True
    # recompute each layer's activations in the backward pass instead of keeping them (same gradients, ~1 more
    # forward): auto = on for the hub families (switch*, the fused decoders), off for fcmoe's upcycled models
    gradient_checkpointing: str = "auto"  # auto | on | off
    # torch's CPU threads for a `fcmoe` command (0 = torch's default, one per core). Part of the experiment: sums
    # over another thread count differ in the last bits, so a resumed run keeps the count it started with
    threads: int = 0

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ConfigError(f"train.threads = {self.threads}: must be >= 0 (0 = one per core, e.g. 1 on a shared "
                              "machine)")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"train.device = {self.device!r}: choose auto, cpu, cuda or cuda:N (default auto)")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision = {self.precision!r}: choose auto, fp32 or bf16 (default auto: the "
                              "checkpoint's own)")
        if self.gradient_checkpointing not in ("auto", "on", "off"):
            raise ConfigError(f"train.gradient_checkpointing = {self.gradient_checkpointing!r}: choose auto, on or off "
                              "(auto = on for hub families)")
        if not (self.client_gpus == -1 or 0 <= self.client_gpus <= 1
                or self.client_gpus > 1 and float(self.client_gpus).is_integer()):
            raise ConfigError(f"train.client_gpus = {self.client_gpus}: a GPU share in [0, 1] (e.g. 0.5), a whole "
                              "number of GPUs, or -1 (one GPU when training on a GPU)")
        if self.client_gpus == 0 and self.device.startswith("cuda"):
            raise ConfigError(f"train.client_gpus = 0 with train.device = {self.device!r}: a Flower client given no "
                              "GPU sees none; give it a share (e.g. 0.5) or -1")
        _positive("train.local_epochs", self.local_epochs)
        if self.local_steps < 0:
            raise ConfigError(f"train.local_steps = {self.local_steps}: must be >= 0 (optimizer steps per round; "
                              "0 = train.local_epochs passes over the data)")
        _positive("train.batch_size", self.batch_size)
        if not self.lr > 0:
            raise ConfigError(f"train.lr = {self.lr}: must be > 0 (default 1e-4)")
        if not (self.router_lr > 0 or self.router_lr == -1):
            raise ConfigError(f"train.router_lr = {self.router_lr}: must be > 0, or -1 (auto: 10 × lr for upcycled "
                              "routers, lr for pretrained ones)")
        if not (self.aux_loss_coef >= 0 or self.aux_loss_coef == -1):
            raise ConfigError(f"train.aux_loss_coef = {self.aux_loss_coef}: must be >= 0, or -1 (auto: the model's "
                              "own)")
        for key in ("weight_decay", "max_grad_norm"):
            if not getattr(self, key) >= 0:
                raise ConfigError(f"train.{key} = {getattr(self, key)}: must be >= 0")
