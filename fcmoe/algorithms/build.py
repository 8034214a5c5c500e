"""A method's algorithm from its name: ``"name"`` or ``"name/variant"`` (a variant's switches on ``[name]``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from fcmoe.algorithms.base import Algorithm, AlgorithmConfig
from fcmoe.config_sections import ConfigError
from fcmoe.models.layout import ExpertLayout
from fcmoe.registry import ALGORITHMS


def split_method(method: str) -> tuple[str, str]:
    """``"fcmoe/no-projection"`` → ``("fcmoe", "no-projection")``; ``"fedavg"`` → ``("fedavg", "")``.

    Raises :class:`ConfigError` naming the unknown algorithm or variant and the valid choices.
    """
    name, _, variant = method.partition("/")
    if name not in ALGORITHMS.names():
        raise ConfigError(f"methods: unknown method {method!r}; choose from {', '.join(ALGORITHMS.names())}")
    variants = ALGORITHMS.get(name).variants
    if variant and variant not in variants:
        known = ", ".join(f"{name}/{v}" for v in variants) or "none"
        raise ConfigError(f"methods: unknown variant {method!r}; {name}'s variants: {known}")
    return name, variant


def method_config(sections: Mapping[str, AlgorithmConfig], method: str) -> AlgorithmConfig:
    """The config of ``method``: its algorithm's section, with the variant's switches applied."""
    name, variant = split_method(method)
    config = sections[name]
    return dataclasses.replace(config, **ALGORITHMS.get(name).variants[variant]) if variant else config


def build_algorithm(sections: Mapping[str, AlgorithmConfig], method: str, layout: ExpertLayout) -> Algorithm:
    """An instance of ``method``'s algorithm with its (variant) config, on ``layout``."""
    algorithm: Algorithm = ALGORITHMS.get(split_method(method)[0])(method_config(sections, method), layout)
    return algorithm
