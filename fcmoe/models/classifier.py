"""An encoder + mean-pooling + linear-head text classifier, split into a frozen and a trainable part.

The split is what makes the default benchmark fit on two CPU cores: the embeddings and the bottom
``frozen_layers`` layers never change, so their output (``features``, ``[B, T, H]``) is computed once per document
and cached; federated training then only runs the top layers (some of them upcycled to MoE) and the head.
Measured on 2 cores for MiniLM-L6 at 16 × 64 tokens: a full dense step costs ~0.6 s, a step of the top 2 MoE
layers (E = 16) and head on cached features ~0.27 s.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig, BertModel, PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask

from fcmoe.models.moe import MoEEncoderLayer

log = logging.getLogger(__name__)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over non-padding tokens (sentence-transformers' pooling): ``[B, T, H]`` → ``[B, H]``."""
    mask = attention_mask.to(hidden.dtype)[:, :, None]  # [B, T, 1]
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


class TrainableTree(nn.Module):
    """Base of the classifiers: the trainable parameters as the tree that clients exchange."""

    def enable_gradient_checkpointing(self) -> None:
        """Keep only each transformer layer's input in training and recompute the rest in the backward pass
        (transformers' activation checkpointing, non-reentrant): activation memory of one layer instead of all,
        for about one more forward pass. The gradients are the same."""
        for module in self.modules():
            if isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing:
                enable = getattr(module, "activation_checkpointing_enable", None)
                if enable is not None:
                    enable({"use_reentrant": False})
                else:  # transformers before activation_checkpointing_enable
                    module.gradient_checkpointing_enable({"use_reentrant": False})
                # transformers also makes the input embeddings' output require grad (for reentrant checkpointing);
                # fcmoe caches that output as its features, which must stay plain tensors outside any graph
                module.disable_input_require_grads()
                return
        raise ValueError(f"{type(self).__name__} holds no transformers model that supports gradient checkpointing")

    def routing_masks(self, attention_mask: torch.Tensor, targets: torch.Tensor | None,
                      ) -> torch.Tensor | dict[str, torch.Tensor]:
        """The real tokens the routers see in a forward pass over a batch with ``attention_mask`` ``[B, T]`` (and
        instruction ``targets``): that mask, or a mask per module-name prefix of the routers where the model cuts
        its rows (an encoder-decoder LM)."""
        return attention_mask

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Detached fp32 CPU copies of the trainable parameters, wherever and in whatever dtype the model holds them:
        the trees clients and the server exchange are fp32."""
        return {name: p.detach().to("cpu", torch.float32, copy=True)
                for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a trainable tree into the model (every trainable key must be present), cast to each parameter's
        dtype."""
        params = dict(self.named_parameters())
        expected = {n for n, p in params.items() if p.requires_grad}
        if set(state) != expected:
            diff = sorted(set(state) ^ expected)
            raise KeyError(f"trainable state does not match the model; differing keys e.g. {diff[:3]}")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)


class EncoderClassifier(TrainableTree):
    """BERT-family encoder with optional upcycled MoE layers and a classification head.

    Parameters
    ----------
    encoder
        A ``BertModel`` (pretrained or random).
    num_labels
        Number of classes C.
    moe_layers
        Indices of the layers to upcycle into :class:`SwitchMoE` blocks (negative: counted from the top).
    num_experts
        Experts per MoE layer E.
    trainable_layers
        Only the top ``trainable_layers`` layers (and the head) train; the embeddings and every lower layer are
        frozen, and their output is the cacheable feature.
    router_init_std
        Standard deviation of the fresh routers' weights.
    """

    def __init__(self, encoder: BertModel, num_labels: int, moe_layers: Sequence[int], num_experts: int,
                 trainable_layers: int, router_init_std: float = 0.02) -> None:
        super().__init__()
        num_layers = encoder.config.num_hidden_layers
        bad = [i for i in moe_layers if not -num_layers <= i < num_layers]
        if bad:
            raise ValueError(f"model.moe_layers {bad} out of range for a {num_layers}-layer encoder")
        moe_layers = sorted({i % num_layers for i in moe_layers})
        if not 1 <= trainable_layers <= num_layers:
            raise ValueError(f"model.trainable_layers = {trainable_layers} must be in [1, {num_layers}]")
        frozen_layers = num_layers - trainable_layers
        if any(i < frozen_layers for i in moe_layers):
            raise ValueError(f"model.moe_layers {moe_layers} include frozen layers (< {frozen_layers}); a frozen "
                             "MoE layer would never be trained: raise model.trainable_layers")
        self.config = encoder.config
        self.embeddings = encoder.embeddings
        layers = list(encoder.encoder.layer)
        for i in moe_layers:
            layers[i] = MoEEncoderLayer(layers[i], num_experts, encoder.config.hidden_act, router_init_std)
        self.frozen = nn.ModuleList(layers[:frozen_layers])
        self.layers = nn.ModuleList(layers[frozen_layers:])
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)
        self.frozen_layers = frozen_layers
        self.checkpointing = False
        for p in [*self.embeddings.parameters(), *self.frozen.parameters()]:
            p.requires_grad_(False)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each trainable layer in the backward pass instead of keeping its activations."""
        self.checkpointing = True

    # ------------------------------------------------------------------ frozen part
    @torch.no_grad()
    def featurize(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Frozen embeddings + bottom layers, eval mode: ``[B, T]`` ids → ``[B, T, H]`` cacheable features."""
        was_training = self.training
        self.eval()
        hidden = self.embeddings(input_ids=input_ids)
        mask = self._mask(hidden, attention_mask)
        for layer in self.frozen:
            hidden = layer(hidden, mask)
        self.train(was_training)
        return hidden

    # ------------------------------------------------------------------ trainable part
    def encode(self, features: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Trainable layers + mean pooling: ``[B, T, H]`` features → ``[B, H]`` sentence vectors."""
        mask = self._mask(features, attention_mask)
        hidden = features
        for layer in self.layers:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, mask, use_reentrant=False)
            else:
                hidden = layer(hidden, mask)
        return mean_pool(hidden, attention_mask)

    def forward(self, features: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, C]`` from cached features."""
        return self.head(self.encode(features, attention_mask))

    head_keys: tuple[str, str] = ("head.weight", "head.bias")

    def _mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)


def tiny_bert_config(vocab_size: int = 1000) -> BertConfig:
    """A 2-layer, d = 64 random BERT for tests: builds in milliseconds."""
    return BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=128, attn_implementation="sdpa")
