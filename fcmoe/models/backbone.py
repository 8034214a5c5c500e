"""Any Hugging Face MoE backbone as a sequence classifier: frozen input embeddings, trainable body, pooled head.

The cached "features" of a document are its token ids (``featurize`` is the identity on ``[B, T]`` ids): caching the
embedding lookups instead would hold ``T × H`` values a document (2 MB for Qwen3 at 512 tokens, bf16) to save a
lookup that costs next to nothing. ``encode`` looks the ids up in the frozen embeddings, runs the backbone and pools
(mean over real tokens for encoders, the last real token for decoders); the head is a fresh linear layer. With LoRA
the backbone is a ``PeftModel`` and only the adapters (and the head) train.
"""

from __future__ import annotations

import torch
from torch import nn

from fcmoe.models.classifier import TrainableTree, mean_pool


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of each sequence's last real token (right padding): ``[B, T, H]`` → ``[B, H]``."""
    last = attention_mask.long().sum(dim=1).clamp_min(1) - 1  # [B]
    return hidden[torch.arange(hidden.shape[0]), last]


class BackboneClassifier(TrainableTree):
    """Classifier over a transformers backbone that accepts ``inputs_embeds`` and returns ``last_hidden_state``.

    Parameters
    ----------
    backbone
        e.g. ``SwitchTransformersEncoderModel``, ``Qwen3MoeModel``, or a ``PeftModel`` wrapping one.
    embeddings
        The backbone's input embedding module (frozen here).
    num_labels
        Number of classes C.
    pooling
        "mean" (encoders) or "last" (decoders).
    """

    head_keys: tuple[str, str] = ("head.weight", "head.bias")

    def __init__(self, backbone: nn.Module, embeddings: nn.Module, num_labels: int, pooling: str) -> None:
        super().__init__()
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling = {pooling!r}: choose 'mean' or 'last'")
        self.backbone = backbone
        self.pooling = pooling
        hidden = embeddings.weight.shape[1]
        self.head = nn.Linear(hidden, num_labels)
        self._embeddings = [embeddings]  # a list: registered once, under the backbone
        embeddings.weight.requires_grad_(False)

    @torch.no_grad()
    def featurize(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What is cached of a document: its token ids ``[B, T]``, as they are."""
        return input_ids

    def encode(self, features: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Frozen embedding lookup, backbone, pooling: ``[B, T]`` ids → ``[B, H]``."""
        with torch.no_grad():
            embedded = self._embeddings[0](features)  # [B, T, H]
        hidden = self.backbone(inputs_embeds=embedded, attention_mask=attention_mask).last_hidden_state
        pool = mean_pool if self.pooling == "mean" else last_token_pool
        return pool(hidden, attention_mask)

    def forward(self, features: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, C]``."""
        return self.head(self.encode(features, attention_mask))
