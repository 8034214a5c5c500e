"""The sections of an experiment about how the federation runs: robustness, participation, attacks, sweeps.

Split from :mod:`fcmoe.config` (which holds data, partition, model, training and the experiment itself); the same
rules apply: frozen dataclasses, validated on construction, one-line :class:`ConfigError` naming key, value, fix.
"""

from __future__ import annotations

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
    """

    every: int = 1

    def __post_init__(self) -> None:
        _positive("eval.every", self.every)

    def scores(self, round_index: int, rounds: int) -> bool:
        """Whether ``round_index`` of ``rounds`` is scored."""
        return round_index == rounds or round_index % self.every == 0


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
