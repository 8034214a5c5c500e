"""One table of cases drives the contract of every registered algorithm."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fcmoe.algorithms import ALGORITHMS
from fcmoe.core import tree_add
from fcmoe.models.build import BuiltModel
from tests.helpers import METHODS, make_updates, random_delta, tiny_model, uploaded


@pytest.fixture(params=METHODS)
def algorithm(request: pytest.FixtureRequest, tiny: BuiltModel):  # noqa: ANN201
    """Every registered algorithm and every variant, at its default config."""
    name, _, variant = request.param.partition("/")
    cls = ALGORITHMS.get(name)
    config = cls.config_class()
    return cls(dataclasses.replace(config, **cls.variants[variant]) if variant else config, tiny.layout)


# the server half is an optimiser with its own step: "the same Δ from everyone moves the model by Δ" does not hold
# (FedAdam's step is tested against Flower's own FedAdam instead)
SERVER_OPTIMISERS = {"fedadam"}


def test_shapes_kept_and_finite(algorithm, tiny: BuiltModel) -> None:  # noqa: ANN001
    state = tiny.model.trainable_state()
    updates = make_updates(tiny, [uploaded(algorithm, random_delta(state, s), state) for s in range(3)], [10, 20, 30])
    new = algorithm.aggregate(state, updates).global_state
    assert new.keys() == state.keys()
    for key, value in new.items():
        assert value.shape == state[key].shape and value.dtype == state[key].dtype, key
        assert torch.isfinite(value).all(), key
    assert any(not torch.equal(new[k], state[k]) for k in state)


def test_identical_updates_are_a_fixed_point(algorithm, tiny: BuiltModel) -> None:  # noqa: ANN001
    """All clients sending Δ = 0 must leave the model as it is; all sending the same Δ must move what they upload
    by exactly Δ and leave the rest (local experts' experts) as it is, unless the server is an optimiser."""
    state = tiny.model.trainable_state()
    zero = uploaded(algorithm, {k: torch.zeros_like(v) for k, v in state.items()}, state)
    still = algorithm.aggregate(state, make_updates(tiny, [zero] * 3, [5, 9, 11])).global_state
    for key in state:
        assert torch.equal(still[key], state[key]), key
    delta = uploaded(algorithm, random_delta(state, 7), state)
    fresh = type(algorithm)(algorithm.config, tiny.layout)
    moved = fresh.aggregate(state, make_updates(tiny, [delta] * 3, [5, 9, 11])).global_state
    if algorithm.name in SERVER_OPTIMISERS:
        return
    expected = tree_add(state, {k: delta.get(k, torch.zeros_like(v)) for k, v in state.items()})
    for key in state:
        torch.testing.assert_close(moved[key], expected[key], rtol=1e-5, atol=1e-6)


def test_same_inputs_same_result_and_inputs_untouched(algorithm, tiny: BuiltModel) -> None:  # noqa: ANN001
    state = tiny.model.trainable_state()
    deltas = [uploaded(algorithm, random_delta(state, s), state) for s in range(4)]
    snapshot = [{k: v.clone() for k, v in d.items()} for d in deltas]
    state_copy = {k: v.clone() for k, v in state.items()}
    first = algorithm.aggregate(state, make_updates(tiny, deltas, [3, 4, 5, 6])).global_state
    again = type(algorithm)(algorithm.config, tiny.layout)  # a fresh server: no state carried from `first`
    second = again.aggregate(state, make_updates(tiny, deltas, [3, 4, 5, 6])).global_state
    for key in state:
        assert torch.equal(first[key], second[key])
        assert torch.equal(state[key], state_copy[key])
    for d, s in zip(deltas, snapshot, strict=True):
        assert all(torch.equal(d[k], s[k]) for k in d)


def test_registry_refuses_a_name_clash() -> None:
    with pytest.raises(ValueError, match="already registered"):
        ALGORITHMS.register("fedavg")(object)


def test_every_layout_case_builds() -> None:
    built = tiny_model(num_experts=3)
    assert [s.num_experts for s in built.layout.layers] == [3, 3]
