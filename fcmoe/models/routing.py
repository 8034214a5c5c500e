"""Routing statistics and the load-balancing loss, from forward hooks on the routers.

FC-MoE's importance weights need f_{i,l,k} = assignments client i made to expert k of layer l / all its
assignments in l (top-1: tokens; top-k: k assignments per token), and FedMoE needs to know which experts a client
used at all. A hook on each layer's router module reads its output, by the layer's ``router_output`` kind:
- "logits": raw logits ``[..., E]``; the choice is the argmax (fcmoe's upcycled Switch-style layers);
- "switch": transformers' Switch router ``(dispatch one-hot [B, T, E], probs, logits)``; tokens whose dispatch row
  is empty were dropped by ``expert_capacity`` and are counted in ``dropped`` instead;
- "topk": ``(logits [B·T, E], scores, indices [B·T, k])`` of the fused-expert families.
Padding tokens (attention mask 0) are never counted; a router that sees another number of tokens than the mask
covers (the text-to-text decoder's start position, one per sequence) counts them all. The hooked logits also
give the Switch load-balancing loss E · Σ_k frac_k · mean_prob_k per layer (frac from the choices, prob from a
softmax of the logits, over all tokens as in transformers' Switch), so one mechanism serves every family.
Cost: an argmax, a bincount and a scatter-add per layer per batch, summed on the router's device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from fcmoe.models.layout import ExpertLayout, MoELayerSpec


def read_router_output(kind: str, output: Any, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits [n, E], choices [n, k], kept [n, k] bool)`` from a router module's output, n = B·T tokens."""
    if kind == "logits":
        logits = output.reshape(-1, num_experts)
        choices = logits.detach().argmax(dim=-1, keepdim=True)
        return logits, choices, torch.ones_like(choices, dtype=torch.bool)
    if kind == "switch":
        dispatch, _, logits = output
        logits = logits.reshape(-1, num_experts)
        choices = logits.detach().argmax(dim=-1, keepdim=True)
        kept = dispatch.reshape(-1, num_experts).sum(dim=-1, keepdim=True) > 0
        return logits, choices, kept
    if kind == "topk":
        logits, _, indices = output
        choices = indices.reshape(logits.reshape(-1, num_experts).shape[0], -1)
        return logits.reshape(-1, num_experts), choices, torch.ones_like(choices, dtype=torch.bool)
    raise ValueError(f"unknown router output kind {kind!r}")


class RoutingRecorder:
    """Counts routing decisions per MoE layer while recording, and collects the balance loss.

    Parameters
    ----------
    model
        The module containing the routers named by ``layout``.
    layout
        The model's :class:`ExpertLayout`; its ``router_module`` names are hooked.
    """

    def __init__(self, model: nn.Module, layout: ExpertLayout) -> None:
        self._layers = list(layout.layers)
        # per layer, on the router's device: [E] assignments counted, then real tokens seen, then assignments
        # dropped (capacity); summed there and read only on request, so recording never stalls a GPU
        self._stats: dict[str, torch.Tensor] = {}
        self._losses: list[torch.Tensor] = []
        self._token_mask: torch.Tensor | None = None
        self._enabled = False
        self.counting = True  # False: only the balance loss (what any MoE training step computes), no statistics
        self._handles = [model.get_submodule(spec.router_module).register_forward_hook(self._make_hook(spec))
                         for spec in layout.layers]

    def _make_hook(self, spec: MoELayerSpec):  # noqa: ANN202 - torch hook signature
        e = spec.num_experts

        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if not self._enabled:
                return
            logits, choices, kept = read_router_output(spec.router_output, output, e)
            if torch.is_grad_enabled() and logits.requires_grad:
                # over every token, padding included, as transformers' Switch computes it
                frac = torch.bincount(choices.reshape(-1), minlength=e).to(torch.float32)
                probs = torch.softmax(logits.float(), dim=-1).mean(dim=0)  # [E]
                self._losses.append(e * (frac / frac.sum() * probs).sum())
            if not self.counting:
                return
            mask = self._token_mask
            # [n, 1] real tokens; a router that sees another count than the mask covers is a text-to-text decoder
            # position, one real token per sequence: nothing to mask
            real = (mask[:, None] if mask is not None and mask.numel() == choices.shape[0]
                    else torch.ones_like(kept[:, :1]))
            stats = self._stats.get(spec.name)
            if stats is None:
                stats = self._stats[spec.name] = torch.zeros(e + 2, dtype=torch.long, device=choices.device)
            stats[:e].scatter_add_(0, choices.reshape(-1), (kept & real).reshape(-1).long())
            stats[e] += real.sum()
            stats[e + 1] += (real & ~kept).sum()

        return hook

    @contextmanager
    def recording(self, attention_mask: torch.Tensor | None) -> Iterator[None]:
        """Count the routing of the forward passes inside the block; ``attention_mask`` [B, T] marks real tokens."""
        self._token_mask = None if attention_mask is None else attention_mask.reshape(-1).bool()
        self._enabled = True
        self._losses = []
        try:
            yield
        finally:
            self._enabled = False
            self._token_mask = None

    def balance_loss(self) -> torch.Tensor:
        """Sum over MoE layers of the Switch load-balancing loss of the last recorded forward."""
        return torch.stack(self._losses).sum() if self._losses else torch.zeros(())

    def reset(self) -> None:
        self._stats = {}

    def _read(self, spec: MoELayerSpec) -> torch.Tensor:
        stats = self._stats.get(spec.name)
        return torch.zeros(spec.num_experts + 2, dtype=torch.long) if stats is None else stats.to("cpu", copy=True)

    @property
    def counts(self) -> dict[str, torch.Tensor]:
        """Layer name → ``[E]`` routed assignments (real tokens only) since the last reset, on the CPU."""
        return {spec.name: self._read(spec)[:spec.num_experts] for spec in self._layers}

    @property
    def tokens(self) -> dict[str, int]:
        """Layer name → real tokens its router saw since the last reset."""
        return {spec.name: int(self._read(spec)[spec.num_experts]) for spec in self._layers}

    @property
    def dropped(self) -> dict[str, int]:
        """Layer name → assignments dropped by ``expert_capacity`` since the last reset."""
        return {spec.name: int(self._read(spec)[spec.num_experts + 1]) for spec in self._layers}

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of the counts so far: layer name → ``[E]`` routed assignments."""
        return self.counts

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
