"""The sections the round and the run read: participation, the server's memory, attacks, evaluation, tracking,
sweeps; and :class:`ConfigError`, which every section raises.

The other sections sit beside the code that reads them: data and partition in :mod:`fcmoe.data.config`, the model
in :mod:`fcmoe.models.config`, local training in :mod:`fcmoe.training.config`, robustness in
:mod:`fcmoe.algorithms.robust`, each algorithm's in its own file; :mod:`fcmoe.config` composes and loads them. The
same rules apply everywhere: frozen dataclasses, validated on construction, one-line :class:`ConfigError` naming
key, value, fix.
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
