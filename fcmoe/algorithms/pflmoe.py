"""PFL-MoE (Guo et al. 2021, arXiv 2012.15589): a global model mixed with a personal model by a local gate.

The global model G is trained by FedAvg and is the only thing communicated. Each client keeps
- a personal head P: a copy of G's classification head, trained locally on 75 % of its train split, on the
  mean-pooled features h(x) of G (G itself stays frozen while P is trained);
- a gate g(x) = σ(vᵀh(x) + b), trained on the other 25 % with G and P fixed;
and predicts o = g·z_G + (1 − g)·z_P on class logits. Head and gate live in the client state and continue
training each round; the extra local epochs they cost are reported in the round metrics. Global accuracy is read
two ways: G's own (every method's), and, as the authors' code reports it, the mean over clients of each client's
mixture on the global test set (``deployed_global_acc_mean``, final round).

Instruction tuning (``task = "sft"``) has no class logits to mix: a personal head over the LM's vocabulary (49k–152k
rows per client) is not what the paper built, so there PFL-MoE deploys the global model and equals FedAvg; the round
metrics say so (``personalisation: "none (sft)"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fcmoe.algorithms.base import Algorithm, AlgorithmConfig, ClientRuntime, ClientUpdate, ServerResult
from fcmoe.core import WEIGHTED_MEAN, MeanRule, Tree
from fcmoe.models.outputs import Prediction
from fcmoe.registry import register_algorithm

if TYPE_CHECKING:  # a hint only: importing training would load transformers with every config
    from fcmoe.training.local import FeatureSet

HEAD, GATE = "pfl_head", "pfl_gate"


@dataclass(frozen=True)
class PFLMoEConfig(AlgorithmConfig):
    """Local personalisation budget (training on pooled features is cheap: a linear layer per client)."""

    head_epochs: int = 5
    gate_epochs: int = 5
    head_fraction: float = 0.75
    lr: float = 1e-2
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.head_epochs < 0 or self.gate_epochs < 0:
            raise ValueError(f"pflmoe.head_epochs/gate_epochs = {self.head_epochs}/{self.gate_epochs}: must be >= 0")
        if not 0.0 < self.head_fraction < 1.0:
            raise ValueError(f"pflmoe.head_fraction = {self.head_fraction}: must be in (0, 1), e.g. 0.75")
        if not self.lr > 0:
            raise ValueError(f"pflmoe.lr = {self.lr}: must be > 0")
        if self.batch_size < 1:
            raise ValueError(f"pflmoe.batch_size = {self.batch_size}: must be >= 1")


class _GatedMixture(nn.Module):
    """o = σ(vᵀh + b)·z_G + (1 − σ(vᵀh + b))·(W_P h + b_P)."""

    def __init__(self, head_weight: torch.Tensor, head_bias: torch.Tensor) -> None:
        super().__init__()
        self.head = nn.Linear(head_weight.shape[1], head_weight.shape[0])
        self.gate = nn.Linear(head_weight.shape[1], 1)
        with torch.no_grad():
            self.head.weight.copy_(head_weight)
            self.head.bias.copy_(head_bias)
            self.gate.weight.zero_()
            self.gate.bias.zero_()  # g = 0.5 until trained

    def forward(self, pooled: torch.Tensor, global_logits: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate(pooled))  # [n, 1]
        return g * global_logits + (1 - g) * self.head(pooled)  # [n, C]


@register_algorithm("pflmoe")
class PFLMoE(Algorithm):
    """FedAvg global model + per-client personal head and sigmoid gate over logits."""

    display_name = "PFL-MoE"
    metric_keys = frozenset({"extra_local_epochs_on_pooled_features", "personalisation"})
    config_class = PFLMoEConfig
    config: PFLMoEConfig

    def aggregate(self, global_state: Tree, updates: Sequence[ClientUpdate],
                  mean: MeanRule = WEIGHTED_MEAN) -> ServerResult:
        extra = self.config.head_epochs + self.config.gate_epochs
        return ServerResult(global_state=self.fedavg(global_state, updates, list(global_state), mean),
                            metrics={"extra_local_epochs_on_pooled_features": extra} if self._has_head else
                            {"personalisation": "none (sft)"})

    @property
    def scores_deployed_on_global_test(self) -> bool:  # type: ignore[override]
        """The authors' code reports the clients' mixtures on the global test set; on sft each client deploys the
        global model itself, whose score is ``global_acc`` already."""
        return self._has_head

    @property
    def _has_head(self) -> bool:
        """Whether the model has a classification head to personalise (a causal LM has none)."""
        return any(key.endswith(("head.weight", "head.bias")) for key in self.layout.shared_keys)

    def personalised_prediction(self, runtime: ClientRuntime, client_state: dict[str, Any], global_state: Tree,
                                train: FeatureSet, test: FeatureSet) -> Prediction:
        if not self._has_head:  # a causal LM: nothing to mix (module docstring)
            return runtime.predict(global_state, test)
        cfg = self.config
        mixture = self._mixture(runtime, client_state, global_state)
        seen = runtime.predict(global_state, train)
        generator = torch.Generator().manual_seed(int(client_state.get("seed", 0)))
        order = torch.randperm(seen.labels.numel(), generator=generator)
        cut = max(1, int(round(cfg.head_fraction * order.numel())))
        head_rows, gate_rows = order[:cut], order[cut:]
        self._fit(mixture.head.parameters(), lambda rows: mixture.head(seen.pooled[rows]),
                  seen.labels, head_rows, cfg.head_epochs, generator)
        if gate_rows.numel():
            self._fit(mixture.gate.parameters(), lambda rows: mixture(seen.pooled[rows], seen.logits[rows]),
                      seen.labels, gate_rows, cfg.gate_epochs, generator)
        client_state[HEAD] = {k: v.detach().clone() for k, v in mixture.head.state_dict().items()}
        client_state[GATE] = {k: v.detach().clone() for k, v in mixture.gate.state_dict().items()}
        return self._mixed(mixture, runtime.predict(global_state, test))

    def deployed_prediction(self, runtime: ClientRuntime, client_state: dict[str, Any], global_state: Tree,
                            data: FeatureSet) -> Prediction:
        """The client's mixture as last fitted (no further training) on ``data``."""
        seen = runtime.predict(global_state, data)
        if not self._has_head:
            return seen
        return self._mixed(self._mixture(runtime, client_state, global_state), seen)

    @staticmethod
    @torch.no_grad()
    def _mixed(mixture: _GatedMixture, seen: Prediction) -> Prediction:
        """``seen`` with the mixture's logits in place of the global model's."""
        return dataclasses.replace(seen, logits=mixture(seen.pooled, seen.logits))

    def _mixture(self, runtime: ClientRuntime, client_state: dict[str, Any], global_state: Tree) -> _GatedMixture:
        weight_key, bias_key = runtime.head_keys
        mixture = _GatedMixture(global_state[weight_key], global_state[bias_key])
        if HEAD in client_state:
            mixture.head.load_state_dict(client_state[HEAD])
            mixture.gate.load_state_dict(client_state[GATE])
        return mixture

    def _fit(self, params: Any, forward: Any, labels: torch.Tensor, rows: torch.Tensor, epochs: int,
             generator: torch.Generator) -> None:
        optimiser = torch.optim.Adam(list(params), lr=self.config.lr)
        for _ in range(epochs):
            for batch in rows[torch.randperm(rows.numel(), generator=generator)].split(self.config.batch_size):
                loss = nn.functional.cross_entropy(forward(batch), labels[batch])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
