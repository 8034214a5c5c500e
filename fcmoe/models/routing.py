"""Routing statistics from forward hooks on the routers: tokens routed to each expert, padding excluded.

FC-MoE's importance weights need f_{i,l,k} = tokens client i routed to expert k of layer l / tokens through l,
and FedMoE needs to know which experts a client used at all. A hook on each router's logits module takes the
top-1 choice per token (argmax of the logits = argmax of the softmax) and counts it where the attention mask is 1.
Cost: one argmax and one bincount per layer per batch, negligible next to the expert matmuls.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from fcmoe.models.layout import ExpertLayout


class RoutingRecorder:
    """Counts top-1 routing decisions per MoE layer while enabled.

    Parameters
    ----------
    model
        The module containing the routers named by ``layout``.
    layout
        The model's :class:`ExpertLayout`; its ``router_module`` names are hooked.
    """

    def __init__(self, model: nn.Module, layout: ExpertLayout) -> None:
        self.counts: dict[str, torch.Tensor] = {s.name: torch.zeros(s.num_experts, dtype=torch.long)
                                                for s in layout.layers}
        self._token_mask: torch.Tensor | None = None
        self._enabled = False
        self._handles = [
            model.get_submodule(spec.router_module).register_forward_hook(self._make_hook(spec.name))
            for spec in layout.layers
        ]

    def _make_hook(self, layer: str):  # noqa: ANN202 - torch hook signature
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], logits: torch.Tensor) -> None:
            if not self._enabled:
                return
            choice = logits.detach().argmax(dim=-1).reshape(-1)  # [B·T]
            if self._token_mask is not None:
                choice = choice[self._token_mask]
            self.counts[layer] += torch.bincount(choice, minlength=self.counts[layer].numel())

        return hook

    @contextmanager
    def recording(self, attention_mask: torch.Tensor | None) -> Iterator[None]:
        """Count the routing of the forward passes inside the block; ``attention_mask`` [B, T] marks real tokens."""
        self._token_mask = None if attention_mask is None else attention_mask.reshape(-1).bool()
        self._enabled = True
        try:
            yield
        finally:
            self._enabled = False
            self._token_mask = None

    def reset(self) -> None:
        for counts in self.counts.values():
            counts.zero_()

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of the counts so far: layer name → ``[E]`` token counts."""
        return {name: c.clone() for name, c in self.counts.items()}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
