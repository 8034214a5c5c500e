"""Expert addressing at its edges (one expert; one trainable layer above a frozen one): gather/scatter round
trips and edits that touch exactly one expert."""

from __future__ import annotations

import pytest
import torch

from fcmoe.models.build import BuiltModel
from fcmoe.models.layout import PerExpertModuleLayout
from tests.helpers import tiny_model

# the edge cases of expert addressing; every family's ordinary case is in tests/models/test_families.py's table
EDGE_CASES = [
    pytest.param(dict(num_experts=1), id="tiny-bert-moe-E1"),
    pytest.param(dict(num_experts=3, trainable_layers=1), id="tiny-bert-moe-top1-frozen1"),
]


@pytest.fixture(params=EDGE_CASES)
def built(request: pytest.FixtureRequest) -> BuiltModel:
    kwargs = dict(request.param)
    if kwargs.get("trainable_layers") == 1:
        from fcmoe.models.build import build_model
        return build_model("tiny-bert-moe", 3, num_experts=kwargs["num_experts"], moe_layers=(-1,),
                           trainable_layers=1, router_init_std=0.5, max_length=16, seed=0)
    return tiny_model(**kwargs)


def test_keys_are_partitioned(built: BuiltModel) -> None:
    layout = built.layout
    state = built.model.trainable_state()
    groups = [set(layout.shared_keys), set(layout.router_keys), set(layout.expert_keys)]
    assert set().union(*groups) == set(state)
    assert sum(len(g) for g in groups) == len(state)
    assert all("experts.expert_" in k for k in layout.expert_keys)
    assert all(k.endswith("router.classifier.weight") for k in layout.router_keys)


def test_gather_scatter_round_trip_is_exact(built: BuiltModel) -> None:
    layout = built.layout
    state = built.model.trainable_state()
    for layer in layout.layers:
        values = layout.gather_experts(state, layer)  # [E, P]
        assert values.shape == (layer.num_experts, layer.expert_numel)
        back = layout.scatter_experts(state, layer, values)
        assert all(torch.equal(back[k], state[k]) for k in state)
        rows = layout.gather_router(state, layer)
        back = layout.scatter_router(state, layer, rows)
        assert all(torch.equal(back[k], state[k]) for k in state)


def test_editing_expert_k_changes_only_expert_k(built: BuiltModel) -> None:
    layout = built.layout
    model = built.model
    state = model.trainable_state()
    layer = layout.layers[-1]
    k = layer.num_experts - 1
    values = layout.gather_experts(state, layer).clone()
    values[k] += 1.0
    edited = layout.scatter_experts(state, layer, values)
    changed = {key for key in state if not torch.equal(edited[key], state[key])}
    assert changed == {part.keys[k] for part in layer.parts}
    # and through the real module: loading the edited tree changes only expert k's parameters
    model.load_trainable_state(edited)
    params = dict(model.named_parameters())
    prefix = f"{layer.name}.experts.expert_{k}."
    for key in state:
        moved = not torch.equal(params[key].detach(), state[key])
        assert moved == key.startswith(prefix), key
    model.load_trainable_state(state)


def test_router_row_k_belongs_to_expert_k(built: BuiltModel) -> None:
    layout = built.layout
    state = built.model.trainable_state()
    layer = layout.layers[0]
    rows = layout.gather_router(state, layer)
    rows[0] = 0.0
    edited = layout.scatter_router(state, layer, rows)
    router = edited[layer.router_keys[0]]
    assert (router[0] == 0).all() and torch.equal(router[1:], state[layer.router_keys[0]][1:])


def test_wrong_shape_is_rejected(built: BuiltModel) -> None:
    layer = built.layout.layers[0]
    with pytest.raises(ValueError, match="expected expert values of shape"):
        built.layout.scatter_experts(built.model.trainable_state(), layer, torch.zeros(1, 1))


def test_inconsistent_experts_are_rejected() -> None:
    shapes = {"m.experts.expert_0.wi.weight": torch.Size([2, 2]), "m.experts.expert_2.wi.weight": torch.Size([2, 2])}
    with pytest.raises(ValueError, match="not 0..1"):
        PerExpertModuleLayout(shapes)
