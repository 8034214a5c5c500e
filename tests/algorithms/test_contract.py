"""One table of cases drives the contract of every registered algorithm: every method and variant crossed with
every way experts are stored."""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch

from fcmoe.algorithms import ALGORITHMS, Algorithm
from fcmoe.core import tree_add
from fcmoe.models.build import BuiltModel
from tests.helpers import METHODS, build_family, make_updates, random_delta, uploaded

# (model.name, model.finetune): per-expert modules (fcmoe's upcycled encoder and decoder, Switch), fused [E, ...]
# tensors, and LoRA factors on fused experts
LAYOUTS = [("tiny-bert-moe", "full"), ("smollm2-moe-tiny", "full"), ("switch-tiny", "full"),
           ("qwen3_moe-tiny", "full"), ("qwen3_moe-tiny", "lora")]
# (method, layout) pairs the contract does not hold for, and why: none; every method aggregates every layout
UNSUPPORTED: dict[tuple[str, tuple[str, str]], str] = {}
CASES = [(method, layout) for method in METHODS for layout in LAYOUTS if (method, layout) not in UNSUPPORTED]


@functools.cache
def _built(name: str, finetune: str) -> BuiltModel:
    return build_family(name, finetune)


@pytest.fixture(params=CASES, ids=[f"{m}-{n}-{f}" for m, (n, f) in CASES])
def case(request: pytest.FixtureRequest) -> tuple[Algorithm, BuiltModel]:
    """An algorithm or variant at its default config, on one layout's model."""
    method, layout = request.param
    built = _built(*layout)
    name, _, variant = method.partition("/")
    cls = ALGORITHMS.get(name)
    config = cls.config_class()
    return cls(dataclasses.replace(config, **cls.variants[variant]) if variant else config, built.layout), built


# the server half is an optimiser with its own step: "the same Δ from everyone moves the model by Δ" does not hold
# (FedAdam's step is tested against Flower's own FedAdam instead)
SERVER_OPTIMISERS = {"fedadam"}


def test_shapes_kept_and_finite(case: tuple[Algorithm, BuiltModel]) -> None:
    algorithm, tiny = case
    state = tiny.model.trainable_state()
    updates = make_updates(tiny, [uploaded(algorithm, random_delta(state, s), state) for s in range(3)], [10, 20, 30])
    new = algorithm.aggregate(state, updates).global_state
    assert new.keys() == state.keys()
    for key, value in new.items():
        assert value.shape == state[key].shape and value.dtype == state[key].dtype, key
        assert torch.isfinite(value).all(), key
    assert any(not torch.equal(new[k], state[k]) for k in state)


def test_identical_updates_are_a_fixed_point(case: tuple[Algorithm, BuiltModel]) -> None:
    """All clients sending Δ = 0 must leave the model as it is; all sending the same Δ must move what they upload
    by exactly Δ and leave the rest (local experts' experts) as it is. A server optimiser (FedAdam) instead takes its
    first Adam step on Δ: every coordinate moves in Δ's direction, by at most its step size."""
    algorithm, tiny = case
    state = tiny.model.trainable_state()
    zero = uploaded(algorithm, {k: torch.zeros_like(v) for k, v in state.items()}, state)
    still = algorithm.aggregate(state, make_updates(tiny, [zero] * 3, [5, 9, 11])).global_state
    for key in state:
        assert torch.equal(still[key], state[key]), key
    delta = uploaded(algorithm, random_delta(state, 7), state)
    fresh = type(algorithm)(algorithm.config, tiny.layout)
    result = fresh.aggregate(state, make_updates(tiny, [delta] * 3, [5, 9, 11]))
    moved = result.global_state
    if algorithm.name in SERVER_OPTIMISERS:
        cfg = algorithm.config
        # |m| / (√v + τ) ≤ (1 − β1) |Δ| / (√(1 − β2) |Δ|) on the first step
        bound = result.metrics["server_step_size"] * (1 - cfg.beta_1) / math.sqrt(1 - cfg.beta_2)
        for key in state:
            step = moved[key] - state[key]
            assert torch.equal(torch.sign(step), torch.sign(delta[key])), key
            assert step.abs().max() <= bound * (1 + 1e-5), key
        return
    expected = tree_add(state, {k: delta.get(k, torch.zeros_like(v)) for k, v in state.items()})
    for key in state:
        torch.testing.assert_close(moved[key], expected[key], rtol=1e-5, atol=1e-6)


def test_same_inputs_same_result_and_inputs_untouched(case: tuple[Algorithm, BuiltModel]) -> None:
    algorithm, tiny = case
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


def test_a_server_metric_no_algorithm_declares_stops_the_round() -> None:
    """A key an algorithm returns without declaring it in ``metric_keys`` (a rename, say) is an error at once,
    before it could vanish from the report."""
    from fcmoe.algorithms.fedavg import FedAvg, FedAvgConfig
    from fcmoe.algorithms.robust import RobustAggregation, RobustConfig
    from fcmoe.rounds import server_step

    class Renamed(FedAvg):
        def aggregate(self, global_state, updates, mean=None):  # type: ignore[no-untyped-def]
            result = super().aggregate(global_state, updates)
            result.metrics["renamed_share"] = 1.0
            return result

    built = _built("tiny-bert-moe", "full")
    state = built.model.trainable_state()
    server = RobustAggregation(Renamed(FedAvgConfig(), built.layout), RobustConfig())
    with pytest.raises(ValueError, match=r"Renamed returned undeclared metrics \['renamed_share'\]: add them to its"):
        server_step(server, state, make_updates(built, [random_delta(state, s) for s in range(2)], [3, 4]))
