"""What a model returns on a dataset, shared by training and the algorithms' client halves (no transformers)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Prediction:
    """Model outputs on a dataset."""

    logits: torch.Tensor  # [n, C]
    pooled: torch.Tensor  # [n, H] sentence vectors before the head
    labels: torch.Tensor  # [n]
    routing_counts: dict[str, torch.Tensor] = field(default_factory=dict)  # layer → [E], when asked for
