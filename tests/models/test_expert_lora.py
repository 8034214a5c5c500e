"""fcmoe's factored expert LoRA against PEFT's merged one: the same outputs and gradients on every fused family,
without PEFT's [E, out, in] copy of each adapted expert stack."""

from __future__ import annotations

import pytest
import torch

from fcmoe.models.build import BuiltModel, build_model
from fcmoe.models.catalog import FUSED
from tests.helpers import TEXTS


def _lora(name: str, expert_lora: str) -> BuiltModel:
    return build_model(name, 3, num_experts=4, moe_layers=(0, 1), trainable_layers=2, router_init_std=0.5,
                       max_length=16, seed=0, finetune="lora", lora_rank=2, expert_lora=expert_lora)


def _pair(name: str) -> tuple[BuiltModel, BuiltModel]:
    """Two identical LoRA models with random (non-zero) B factors: PEFT's merged forward, and fcmoe's factored."""
    merged, factored = _lora(name, "merged"), _lora(name, "factored")
    rerouted = [sum("forward" in vars(m) for m in b.model.modules()) for b in (merged, factored)]
    assert rerouted == [0, len(factored.layout.layers)]
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for (_, a), (_, b) in zip(merged.model.named_parameters(), factored.model.named_parameters(), strict=True):
            if a.requires_grad:
                a.copy_(torch.randn(a.shape, generator=generator) * 0.1)
                b.copy_(a)
    return merged, factored


def _step(built: BuiltModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids, mask = built.tokenize(TEXTS * 2)
    features = built.model.featurize(ids, mask)
    built.model.train()
    logits = built.model(features, mask)
    logits.square().sum().backward()
    return logits.detach(), {n: p.grad for n, p in built.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", FUSED)
def test_factored_expert_lora_equals_peft(family: str) -> None:
    merged, factored = _pair(f"{family}-tiny")
    logits, grads = _step(merged)
    again, grads_again = _step(factored)
    torch.testing.assert_close(again, logits, rtol=1e-4, atol=1e-5)
    expert_keys = set(merged.layout.expert_keys)
    assert expert_keys and all(grads[k] is not None and grads[k].any() for k in expert_keys)
    for key, grad in grads.items():
        torch.testing.assert_close(grads_again[key], grad, rtol=1e-4, atol=1e-5, msg=key)


def test_factored_expert_lora_keeps_no_expert_stack_for_backward() -> None:
    """The tensors autograd keeps: PEFT's include a [E, out, in] merged stack per target; fcmoe's none that size."""
    sizes = {}
    for name, built in zip(("merged", "factored"), _pair("qwen3_moe-tiny"), strict=True):
        saved: list[int] = []
        ids, mask = built.tokenize(TEXTS)
        features = built.model.featurize(ids, mask)
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t.numel()) or t,
                                                      lambda t: t):
            built.model(features, mask)
        sizes[name] = max(saved)
    stack = 4 * 2 * 32 * 64  # E × 2I × H: one gate_up_proj stack
    assert sizes["merged"] >= stack > sizes["factored"]
