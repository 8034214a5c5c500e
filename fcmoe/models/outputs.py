"""What a model returns on a dataset, shared by training and the algorithms' client halves (no transformers)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Prediction:
    """Model outputs on a dataset."""

    logits: torch.Tensor  # [n, C] (a causal LM: [n, 0])
    pooled: torch.Tensor  # [n, H] sentence vectors before the head (a causal LM: [n, 0])
    labels: torch.Tensor  # [n] classes (a causal LM: tasks)
    routing_counts: dict[str, torch.Tensor] = field(default_factory=dict)  # layer → [E], when asked for
    scores: torch.Tensor | None = None  # [n] a causal LM: each response's generation score in [0, 1]
    losses: torch.Tensor | None = None  # [n] a causal LM: each response's mean token loss

    def correct(self) -> torch.Tensor:
        """``[n]`` float64 per-document score: 1/0 for the top class, or a causal LM's generation score."""
        if self.scores is not None:
            return self.scores.double()
        return (self.logits.argmax(dim=-1) == self.labels).double()

    def split(self, sizes: list[int]) -> list[Prediction]:
        """The predictions of consecutive blocks of ``sizes`` documents (routing counts are not split)."""
        fields = {name: getattr(self, name) for name in ("logits", "pooled", "labels", "scores", "losses")}
        parts = {name: [None] * len(sizes) if value is None else value.split(sizes)
                 for name, value in fields.items()}
        return [Prediction(**{name: parts[name][i] for name in fields}) for i in range(len(sizes))]

    def score(self) -> float:
        """Accuracy (classification, a float32 mean as ever) or the mean generation score (instruction tuning); NaN
        on no document."""
        if not self.labels.numel():
            return float("nan")
        return self.correct().mean().item() if self.scores is not None else self.correct().float().mean().item()
