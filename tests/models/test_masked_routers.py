"""FedMoE's sub-MoE mask on every fused family's own router: nothing masked = the family's routing bit for bit;
a masked expert is never chosen and gets no gradient, its router row included."""

from __future__ import annotations

import pytest
import torch

from fcmoe.models.build import BuiltModel
from fcmoe.models.catalog import FUSED
from fcmoe.models.masked_routers import MASKED_RULES, masked_rule
from fcmoe.models.routing import RoutingRecorder, masked_routing
from tests.helpers import TEXTS, build_family

CASES = [(f"{family}-tiny", finetune) for family in FUSED for finetune in ("full", "lora")]


GROUPED = ["deepseek_v2-grouped", "deepseek_v3-grouped"]


def _grouped_deepseek(family: str) -> BuiltModel:
    """DeepSeek with 2 groups of 2 experts, 1 group chosen per token: the group-limited choice is exercised."""
    from fcmoe.models import families

    spec = families.FAMILIES[family]
    extra = {"topk_method": "group_limited_greedy"} if family == "deepseek_v2" else {}
    grouped = families.Family(**{**spec.__dict__, "tiny": {**spec.tiny, "n_group": 2, "topk_group": 1, **extra}})
    families.FAMILIES[family] = grouped
    try:
        return build_family(f"{family}-tiny", "full")
    finally:
        families.FAMILIES[family] = spec


def _model(name: str, finetune: str) -> BuiltModel:
    return _grouped_deepseek(name.removesuffix("-grouped")) if name in GROUPED else build_family(name, finetune)


def _inputs(built: BuiltModel) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = built.tokenize(TEXTS * 3)
    return built.model.featurize(ids, mask), mask


@pytest.mark.parametrize("name", [f"{family}-tiny" for family in FUSED] + GROUPED)
def test_nothing_masked_is_the_familys_own_routing(name: str) -> None:
    built = _model(name, "full")
    for spec in built.layout.layers:
        router = built.model.get_submodule(spec.router_module)
        hidden = torch.randn(37, router.weight.shape[1], generator=torch.Generator().manual_seed(1))
        own = router(hidden)
        again = masked_rule(router, spec.name)(router, hidden, torch.zeros(spec.num_experts))
        for a, b in zip(own, again, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize(("name", "finetune"), CASES + [(name, "full") for name in GROUPED],
                         ids=[f"{n}-{f}" for n, f in CASES] + GROUPED)
def test_a_masked_expert_is_never_chosen_and_gets_no_gradient(name: str, finetune: str) -> None:
    built = _model(name, finetune)
    model, layout = built.model, built.layout
    assert layout.top_k == 2
    held = torch.tensor([1.0, 0.0, 1.0, 0.0])
    masks = {spec.name: held for spec in layout.layers}
    features, attention = _inputs(built)
    recorder = RoutingRecorder(model, layout)
    model.train()
    model.zero_grad()
    with masked_routing(model, layout, masks), recorder.recording(attention):
        logits = model(features, attention)
        (logits.sum() + recorder.balance_loss()).backward()
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()
             if p.requires_grad}
    for spec in layout.layers:
        counts = recorder.counts[spec.name]
        assert counts[[1, 3]].sum() == 0 and counts[[0, 2]].sum() == 2 * int(attention.sum())
        expert_grads = layout.gather_experts(grads, spec)  # [E, P]
        assert not expert_grads[[1, 3]].any() and expert_grads[[0, 2]].any()
        router_grads = layout.gather_router(grads, spec)  # [E, R]; LoRA keeps routers frozen: R = 0
        assert not router_grads[[1, 3]].any()
        if router_grads.shape[1]:
            assert router_grads[[0, 2]].any()
    recorder.reset()
    with recorder.recording(attention), torch.no_grad():  # outside the block the mask is gone
        model(features, attention)
    assert any(recorder.counts[spec.name][[1, 3]].sum() > 0 for spec in layout.layers)


def test_fewer_held_experts_than_the_router_chooses_is_refused() -> None:
    built = build_family("qwen3_moe-tiny", "full")
    masks = {spec.name: torch.tensor([1.0, 0.0, 0.0, 0.0]) for spec in built.layout.layers}
    with pytest.raises(ValueError, match="a sub-MoE of a top-2 router must hold at least 2 experts, got 1"):
        with masked_routing(built.model, built.layout, masks):
            pass


def test_every_fused_family_has_a_rule() -> None:
    for family in FUSED:
        built = build_family(f"{family}-tiny", "full")
        for spec in built.layout.layers:
            assert type(built.model.get_submodule(spec.router_module)).__name__ in MASKED_RULES
