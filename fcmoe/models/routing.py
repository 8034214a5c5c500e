"""Routing statistics and the load-balancing loss, from forward hooks on the routers.

FC-MoE's importance weights need f_{i,l,k} = assignments client i made to expert k of layer l / all its
assignments in l (top-1: tokens; top-k: k assignments per token), and FedMoE needs to know which experts a client
used at all. A hook on each layer's router module reads its output, by the layer's ``router_output`` kind:
- "logits": raw logits ``[..., E]``; the choice is the argmax (fcmoe's upcycled Switch-style layers);
- "switch": transformers' Switch router ``(dispatch one-hot [B, T, E], probs, logits)``; tokens whose dispatch row
  is empty were dropped by ``expert_capacity`` and are counted in ``dropped`` instead;
- "topk": ``(logits [B·T, E], scores, indices [B·T, k])`` of the fused-expert families.
Padding tokens (attention mask 0) are never counted (an encoder-decoder LM gives each stack its own mask); a router
that sees another number of tokens than the mask covers (the text-to-text classifier's decoder start position, one
per sequence) counts them all. The hooked logits also give the Switch load-balancing loss
E · Σ_k frac_k · mean_prob_k per layer (frac from the choices, prob from a softmax of the logits, over all tokens
as in transformers' Switch), so one mechanism serves every family.
While training, the recorder also keeps router *scores* per layer (HFedMoE's usage and importance): the mean
router probability of each expert over real tokens, and the mean and max over batches of each batch's mean.
Cost: an argmax, a bincount, a softmax and a few scatter-adds per layer per batch, summed on the router's device.

:func:`masked_routing` adds −∞ to the logits of experts outside a client's sub-MoE (FedMoE) before anything reads
them, so those experts are never chosen and get no gradient; it runs before the recorder's hook. Routers that choose
inside their own forward (the fused families) re-do their family's choice with the mask
(:mod:`fcmoe.models.masked_routers`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from fcmoe.models.layout import ExpertLayout, MoELayerSpec
from fcmoe.models.masked_routers import masked_rule


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
        # per layer: [4, E] sum of router probabilities over real tokens, sum and max over batches of the batch mean
        # probability, and in row 3 the batch and real-token counts; only while gradients flow (training)
        self._scores: dict[str, torch.Tensor] = {}
        self._losses: list[tuple[torch.Tensor, torch.Tensor]] = []  # (router logits [n, E], frac [E]) per layer
        self._token_masks: dict[str, torch.Tensor] = {}  # router-name prefix → [B·T] real tokens
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
            mask = next((m for prefix, m in self._token_masks.items() if spec.router_module.startswith(prefix)), None)
            # [n, 1] real tokens; a router that sees another count than the mask covers is a text-to-text decoder
            # position, one real token per sequence: nothing to mask
            real = (mask[:, None] if mask is not None and mask.numel() == choices.shape[0]
                    else torch.ones_like(kept[:, :1]))
            if torch.is_grad_enabled() and logits.requires_grad:
                # over every token, padding included, as transformers' Switch computes it; the differentiable part
                # waits for balance_loss(), outside the layer: under gradient checkpointing the layer re-runs in the
                # backward pass with the recorder off, and must save the same tensors for backward both times
                frac = torch.bincount(choices.reshape(-1), minlength=e).to(torch.float32)
                self._losses.append((logits, frac))
                self._add_scores(spec, torch.softmax(logits.detach().float(), dim=-1), real)
            if not self.counting:
                return
            stats = self._stats.get(spec.name)
            if stats is None:
                stats = self._stats[spec.name] = torch.zeros(e + 2, dtype=torch.long, device=choices.device)
            stats[:e].scatter_add_(0, choices.reshape(-1), (kept & real).reshape(-1).long())
            stats[e] += real.sum()
            stats[e + 1] += (real & ~kept).sum()

        return hook

    def _add_scores(self, spec: MoELayerSpec, probs: torch.Tensor, real: torch.Tensor) -> None:
        """Accumulate one batch's router probabilities ``[n, E]`` over its real tokens ``real [n, 1]``."""
        scores = self._scores.get(spec.name)
        if scores is None:
            scores = self._scores[spec.name] = torch.zeros(4, spec.num_experts, device=probs.device)
            scores[2] = -1.0  # below any probability: the first batch sets the max
        summed = (probs * real).sum(dim=0)  # [E]
        batch_mean = summed / real.sum().clamp_min(1)
        scores[0] += summed
        scores[1] += batch_mean
        torch.maximum(scores[2], batch_mean, out=scores[2])
        scores[3, 0] += 1
        scores[3, 1] += real.sum()

    @contextmanager
    def recording(self, attention_mask: torch.Tensor | Mapping[str, torch.Tensor] | None) -> Iterator[None]:
        """Count the routing of the forward passes inside the block; ``attention_mask`` [B, T] marks real tokens,
        or one mask per router-name prefix (``TrainableTree.routing_masks``: an encoder-decoder's two stacks)."""
        masks = {} if attention_mask is None else (
            dict(attention_mask) if isinstance(attention_mask, Mapping) else {"": attention_mask})
        self._token_masks = {prefix: mask.reshape(-1).bool() for prefix, mask in masks.items()}
        self._enabled = True
        self._losses = []
        try:
            yield
        finally:
            self._enabled = False
            self._token_masks = {}

    def balance_loss(self) -> torch.Tensor:
        """Sum over MoE layers of the Switch load-balancing loss E · Σ_k frac_k · mean_prob_k of the last recorded
        forward."""
        losses = [logits.shape[-1] * (frac / frac.sum() * torch.softmax(logits.float(), dim=-1).mean(dim=0)).sum()
                  for logits, frac in self._losses]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def reset(self) -> None:
        self._stats = {}
        self._scores = {}

    def router_scores(self) -> dict[str, torch.Tensor]:
        """Layer name → ``[3, E]`` on the CPU, over the training batches since the last reset: row 0 the usage
        u(e) = mean router probability of e over real tokens, rows 1 and 2 the mean and max over batches of the
        batch's mean probability (HFedMoE's router score). Zeros for a layer that saw no training batch."""
        out = {}
        for spec in self._layers:
            scores = self._scores.get(spec.name)
            if scores is None:
                out[spec.name] = torch.zeros(3, spec.num_experts)
                continue
            scores = scores.to("cpu", copy=True).double()
            batches, tokens = scores[3, 0].clamp_min(1), scores[3, 1].clamp_min(1)
            out[spec.name] = torch.stack([scores[0] / tokens, scores[1] / batches, scores[2].clamp_min(0)]).float()
        return out

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


@contextmanager
def masked_routing(model: nn.Module, layout: ExpertLayout, mask: Mapping[str, torch.Tensor] | None) -> Iterator[None]:
    """Inside the block, experts outside ``mask`` (layer name → ``[E]``, nonzero = the client holds it) are masked
    out of routing: −∞ is added to their router logits before top-k, so they are never chosen and get no gradient
    (FedMoE's sub-MoE, in training and in the deployed model). ``None`` or ``{}`` masks nothing. A top-k router
    needs at least k held experts per layer (``ValueError`` otherwise)."""
    handles = []
    try:
        for spec in layout.layers if mask else ():
            if spec.name not in mask:
                continue
            held = mask[spec.name].bool()
            if int(held.sum()) < layout.top_k:
                raise ValueError(f"{spec.name}: a sub-MoE of a top-{layout.top_k} router must hold at least "
                                 f"{layout.top_k} experts, got {int(held.sum())}")
            bias = torch.zeros(spec.num_experts).masked_fill(~held, float("-inf"))  # [E]
            if spec.logits_module is not None:
                def add_bias(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor,
                             bias: torch.Tensor = bias) -> torch.Tensor:
                    return output + bias.to(output.device, output.dtype)

                hooked, hook = spec.logits_module, add_bias
            else:  # the router chooses inside its forward: re-do its choice with the mask (masked_routers)
                hooked = spec.router_module
                rule = masked_rule(model.get_submodule(hooked), spec.name)

                def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any, bias: torch.Tensor = bias,
                         rule: Any = rule) -> Any:
                    return rule(module, inputs[0], bias.to(inputs[0].device))

            handles.append(model.get_submodule(hooked).register_forward_hook(hook, prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
