"""Federated algorithms, one file each (config + server half + client half), registered by name."""

from fcmoe.algorithms import fcmoe, fedadam, fedavg, fedmoe, hfedmoe, localexperts, pflmoe  # noqa: F401  (registration)
from fcmoe.algorithms.base import Algorithm, AlgorithmConfig, ClientUpdate, ServerResult
from fcmoe.registry import ALGORITHMS

__all__ = ["ALGORITHMS", "Algorithm", "AlgorithmConfig", "ClientUpdate", "ServerResult"]
