"""FedAdam (Reddi et al., "Adaptive Federated Optimization", ICLR 2021), as Flower's ``FedAdam`` strategy.

The server treats the FedAvg pseudo-gradient d_t = Σ_i (n_i / Σ_j n_j) Δ_i as a gradient step and runs Adam on it:

    m_t = β1·m_{t−1} + (1 − β1)·d_t
    v_t = β2·v_{t−1} + (1 − β2)·d_t²
    θ_{t+1} = θ_t + η_t · m_t / (√v_t + τ),   η_t = η · √(1 − β2^(t+1)) / (1 − β1^(t+1))

The bias correction uses t + 1 where t counts the aggregations from 1, as Flower's ``FedAdam`` does (its
``server_round + 1``), so the two give the same models on the same replies (tested, two rounds). Clients train as in
FedAvg and deploy the global model. The moments are server state, kept across rounds and in checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fcmoe.algorithms.base import Algorithm, AlgorithmConfig, ClientUpdate, ServerResult
from fcmoe.core import WEIGHTED_MEAN, MeanRule, Tree
from fcmoe.models.layout import ExpertLayout
from fcmoe.registry import register_algorithm


@dataclass(frozen=True)
class FedAdamConfig(AlgorithmConfig):
    """FedAdam's server optimiser.

    Attributes
    ----------
    eta
        Server learning rate η. Flower's default 0.1 is far too large a step for a pretrained model; the default
        here was chosen by a small grid on the default benchmark (``results/fedadam-eta.md``).
    beta_1, beta_2
        Adam's moment decay rates (Flower's defaults).
    tau
        τ, added to √v: the smaller, the more adaptive (Flower's default 1e-3).
    """

    eta: float = 0.01
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if not self.eta > 0:
            raise ValueError(f"fedadam.eta = {self.eta}: must be > 0 (default 0.01)")
        for key in ("beta_1", "beta_2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"fedadam.{key} = {getattr(self, key)}: must be in [0, 1)")
        if not self.tau > 0:
            raise ValueError(f"fedadam.tau = {self.tau}: must be > 0 (default 1e-3)")


@register_algorithm("fedadam")
class FedAdam(Algorithm):
    """Adam on the server over FedAvg's pseudo-gradient; the deployed local model is the global one."""

    display_name = "FedAdam"
    metric_keys = frozenset({"server_step_size"})
    config_class = FedAdamConfig
    config: FedAdamConfig

    def __init__(self, config: FedAdamConfig, layout: ExpertLayout) -> None:
        super().__init__(config, layout)
        self.first_moment: Tree = {}  # m
        self.second_moment: Tree = {}  # v
        self.steps = 0  # t: aggregations so far

    def aggregate(self, global_state: Tree, updates: Sequence[ClientUpdate],
                  mean: MeanRule = WEIGHTED_MEAN) -> ServerResult:
        cfg = self.config
        averaged = self.fedavg(global_state, updates, list(global_state), mean)
        self.steps += 1
        t = self.steps + 1  # Flower's exponent: server_round + 1
        step_size = cfg.eta * math.sqrt(1 - cfg.beta_2 ** t) / (1 - cfg.beta_1 ** t)
        state = {}
        for key, theta in global_state.items():
            d = (averaged[key] - theta).float()  # d_t, the FedAvg pseudo-gradient
            m = self.first_moment.get(key, torch.zeros_like(d)) * cfg.beta_1 + (1 - cfg.beta_1) * d
            v = self.second_moment.get(key, torch.zeros_like(d)) * cfg.beta_2 + (1 - cfg.beta_2) * d.square()
            self.first_moment[key], self.second_moment[key] = m, v
            state[key] = (theta.float() + step_size * m / (v.sqrt() + cfg.tau)).to(theta.dtype)
        return ServerResult(global_state=state, metrics={"server_step_size": step_size})

    def server_state(self) -> Tree:
        return {**{f"m/{k}": v for k, v in self.first_moment.items()},
                **{f"v/{k}": v for k, v in self.second_moment.items()},
                "steps": torch.tensor(self.steps)}

    def load_server_state(self, state: Tree) -> None:
        self.first_moment = {k.removeprefix("m/"): v for k, v in state.items() if k.startswith("m/")}
        self.second_moment = {k.removeprefix("v/"): v for k, v in state.items() if k.startswith("v/")}
        self.steps = int(state["steps"]) if "steps" in state else 0
