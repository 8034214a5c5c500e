"""LoRA on fused experts without a merged copy of the expert stack.

PEFT adapts a fused expert tensor ``W [E, out, in]`` (``LoraConfig(target_parameters=…)``) by re-parametrising it:
every forward computes ``W + s·B·A`` as a full ``[E, out, in]`` tensor, and autograd keeps it for the backward pass
— one extra copy of every MoE layer's experts (≈ 0.8 GB a layer for OLMoE-1B-7B in bf16, 1.2 GB for Qwen3-30B-A3B).
Here each routed expert e applies its adapter to the tokens it receives instead,

    y = x·W_eᵀ + s·(x·A_eᵀ)·B_eᵀ            x: [tokens of e, in], A_e: [r, in], B_e: [out, r]

so the extra memory is ``[tokens, r]`` per expert. The parameters are PEFT's own, in PEFT's layout (expert e's
rows ``e·r:(e+1)·r`` of ``lora_A``, columns ``e, e+E, …`` of ``lora_B``: what :class:`~fcmoe.models.layout.
LoRAExpertLayout` addresses), so trees, checkpoints and aggregation do not change. Outputs and gradients equal
PEFT's (tested on every fused family). The expert loop is transformers' eager one (one host read of the group sizes
per layer); the base product of each expert runs on its own slice of ``W``, never on a copy.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import ParamWrapper
from torch import nn


def use_factored_expert_lora(model: nn.Module) -> int:
    """Route every LoRA-adapted fused experts module in ``model`` (a PEFT model) through :func:`factored_experts`;
    returns how many were rerouted."""
    count, nested = 0, set()
    for module in model.modules():  # parents come before their children
        if not isinstance(module, ParamWrapper) or id(module) in nested:
            continue
        wrappers, inner = {}, module  # PEFT nests one wrapper per targeted parameter: handled with the outermost
        while isinstance(inner, ParamWrapper):
            wrappers[inner.parameter_name] = inner
            nested.add(id(inner))
            inner = inner.base_layer
        if getattr(inner, "num_experts", 1) > 1:
            module.forward = partial(factored_experts, inner, wrappers)
            count += 1
    return count


def factored_experts(experts: nn.Module, wrappers: dict[str, ParamWrapper], hidden: torch.Tensor,
                     top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """Transformers' fused-experts forward with each target's LoRA applied per expert (module docstring).

    ``hidden [n, H]``, ``top_k_index [n, k]``, ``top_k_weights [n, k]`` → ``[n, H]``.
    """
    num_experts, k = experts.num_experts, top_k_index.shape[-1]
    slots = top_k_index.reshape(-1)  # [n·k] the expert of each (token, choice)
    order = slots.argsort(stable=True)  # slots grouped by expert, tokens in order within a group
    sizes = torch.bincount(slots, minlength=num_experts).tolist()  # [E] one host read per layer
    weights = top_k_weights.reshape(-1)
    out = torch.zeros_like(hidden)
    for e, group in enumerate(order.split(sizes)):
        if not group.numel():  # an expert with no token is not called: no gradient reaches it
            continue
        tokens = group // k
        h = _project(experts, wrappers, "gate_up_proj", e, hidden[tokens])  # [s, 2I]
        h = experts._apply_gate(h) if getattr(experts, "has_gate", True) else experts.act_fn(h)  # [s, I]
        y = _project(experts, wrappers, "down_proj", e, h) * weights[group, None]  # [s, H]
        out.index_add_(0, tokens, y.to(out.dtype))
    return out


def _project(experts: nn.Module, wrappers: dict[str, ParamWrapper], name: str, e: int,
             x: torch.Tensor) -> torch.Tensor:
    """``x`` through expert ``e``'s ``name`` projection, its bias and its LoRA: ``[s, in]`` → ``[s, out]``."""
    weight = getattr(experts, name)[e]  # [out, in], or [in, out] where the family stores it transposed (GPT-OSS)
    y = x @ weight if getattr(experts, "is_transposed", False) else F.linear(x, weight)
    if getattr(experts, "has_bias", False):
        y = y + getattr(experts, f"{name}_bias")[e]
    wrapper = wrappers.get(name)
    if wrapper is None or wrapper.disable_adapters:
        return y
    for adapter in wrapper.active_adapters:
        lora_a, lora_b = wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight  # [E·r, in], [out, E·r]
        r = lora_a.shape[0] // experts.num_experts
        a_e, b_e = lora_a[e * r:(e + 1) * r], lora_b[:, e::experts.num_experts]  # [r, in], [out, r]
        y = y + wrapper.scaling[adapter] * F.linear(F.linear(x, a_e), b_e)
    return y
