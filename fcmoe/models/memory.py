"""What one client's local training step holds on its device, estimated from the model's shapes alone.

:func:`estimate_step` reads a model built on the ``meta`` device (every shape, no memory) and adds up, in bytes:

- ``weights``: every parameter in its plan dtype (:mod:`fcmoe.models.precision`): frozen ones in the checkpoint's
  dtype, trainable ones as fp32 masters (or bf16 without them);
- ``gradients`` and ``optimizer``: one and two (AdamW's moments) copies of the trainable parameters in their dtype;
- ``merged experts``: PEFT's merged forward (``model.expert_lora = "merged"``) makes a full copy of each adapted
  expert stack in the weights' dtype and keeps it for the backward pass: every MoE layer's, or one at a time under
  gradient checkpointing; fcmoe's factored forward makes none;
- ``activations``: the tensors autograd keeps per token, per layer, in the compute dtype (2 bytes under bf16):
  attention ``4H + 2·q + 3·kv`` (layer input, norms, q/k/v, rotated q/k, output), the block's ``2H``, the router's
  ``E`` logits and probabilities in fp32, and per routed expert ``2H + 5I + 2r`` (its input, gate/up output, the
  activation's inputs and output, its output, LoRA's ``x·Aᵀ`` twice), a shared expert's ``H + 5I_s``; a dense
  layer's MLP ``H + 5I``. Under
  gradient checkpointing only each layer's input ``H`` is kept, plus one layer's activations while it is
  recomputed.

H = hidden size, q = attention heads × head size, kv = key-value heads × head size, E experts, k routed per token,
I = an expert's intermediate size, r the LoRA rank. ``bench/memory.py`` measures the same step at real widths and
prints how far these figures are from it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fcmoe.models.layout import ExpertLayout
from fcmoe.models.precision import PrecisionPlan

GIB = 2**30


@dataclass(frozen=True)
class StepMemory:
    """Bytes by component (see the module docstring) and the parameter counts they come from."""

    parameters: int
    trainable: int
    device: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.device.values())

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value / GIB:.1f}" for name, value in self.device.items())
        return f"{self.total / GIB:.1f} GiB ({parts})"


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def estimate_step(model: nn.Module, layout: ExpertLayout, plan: PrecisionPlan, *, tokens: int,
                  checkpointing: bool, expert_lora: str, lora_rank: int = 0) -> StepMemory:
    """The device memory of one local step of ``model`` (built on any device, ``meta`` included) on ``tokens``
    tokens (batch × length)."""
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trained_bytes = trainable * _bytes(plan.trainable)
    device = {"weights": frozen * _bytes(plan.frozen) + trained_bytes, "gradients": trained_bytes,
              "optimizer": 2 * trained_bytes}
    config = text_config(model)
    compute = _bytes(plan.compute)
    if layout.storage == "lora" and expert_lora == "merged":
        stacks = [sum(_base_numel(model, part.keys[0]) for part in layer.parts if part.kind == "lora_a")
                  for layer in layout.layers]
        device["merged experts"] = (max(stacks) if checkpointing else sum(stacks)) * _bytes(plan.frozen)
    per_layer = _activations_per_token(config, layout, lora_rank if layout.storage == "lora" else 0)
    hidden = config.hidden_size
    if checkpointing:
        device["activations"] = tokens * compute * (len(per_layer) * hidden + max(per_layer))
    else:
        device["activations"] = tokens * compute * sum(per_layer)
    return StepMemory(frozen + trainable, trainable, device)


def text_config(model: nn.Module) -> Any:
    """The transformers config of the model inside ``model`` (under heads and PEFT's wrappers)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            return config
    raise ValueError(f"{type(model).__name__} holds no transformers model")


def _base_numel(model: nn.Module, lora_key: str) -> int:
    """Elements of the expert stack a LoRA factor adapts (the wrapper's base parameter)."""
    wrapper = model.get_submodule(lora_key.rsplit(".lora_A.", 1)[0])
    return wrapper.get_param().numel()


def _activations_per_token(config: Any, layout: ExpertLayout, rank: int) -> list[float]:
    """Values autograd keeps per token in each layer, in order (MoE and dense layers alike)."""
    hidden = config.hidden_size
    heads = getattr(config, "num_attention_heads", None) or config.num_heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or hidden // heads
    if getattr(config, "kv_lora_rank", None):  # DeepSeek's MLA: q and k carry a rope part besides the nope part
        head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    attention = 4 * hidden + 2 * heads * head_dim + 3 * kv_heads * head_dim
    layers = getattr(config, "num_hidden_layers", None) or config.num_layers
    moe = {int(re.search(r"\.(\d+)\.", spec.name)[1]): spec for spec in layout.layers}  # layer index → its MoE
    shared = (getattr(config, "shared_expert_intermediate_size", 0)
              or getattr(config, "n_shared_experts", 0) * getattr(config, "moe_intermediate_size", 0) or 0)
    out = []
    for index in range(layers):
        spec = moe.get(index)
        if spec is None:
            inner = getattr(config, "intermediate_size", None) or getattr(config, "d_ff", 4 * hidden)
            out.append(attention + 2 * hidden + hidden + 5 * inner)
            continue
        routed = layout.top_k * (2 * hidden + 5 * _expert_inner(config) + 2 * rank)
        shared_mlp = hidden + 5 * shared if shared else 0
        out.append(attention + 2 * hidden + 4 * spec.num_experts + routed + shared_mlp)
    return out


def _expert_inner(config: Any) -> int:
    for key in ("moe_intermediate_size", "intermediate_size", "d_ff"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    raise ValueError("the model config names no expert intermediate size")


def idle_expert_parameters(model: nn.Module, top_k: int) -> int:
    """Σ over MoE layers of (E − k) × one expert's base parameters: what a token routed to k experts never uses."""
    idle = 0
    for name, module in model.named_modules():
        if not name.endswith(".experts"):
            continue
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module  # under PEFT's wrappers
        experts = getattr(base, "num_experts", None) or len(base)  # fused, or a ModuleDict of expert modules
        numel = sum(p.numel() for key, p in base.named_parameters() if "lora_" not in key)
        idle += (experts - top_k) * numel // experts
    return idle


@contextmanager
def kept_for_backward(model: nn.Module) -> Iterator[dict[int, int]]:
    """Inside the block, count what autograd saves for the backward pass: bytes of each unique storage other than
    ``model``'s parameters (what a step keeps besides its weights; the measurement ``estimate_step`` is checked
    against)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        yield saved
