"""FC-MoE against its definition: FedAvg limit, importance weighting, projection and retention."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fcmoe.algorithms.fcmoe import (
    EXPERTS,
    OLDER_RETAINED,
    RETAINED,
    ROWS,
    SCALE,
    STEP,
    FCMoE,
    FCMoEConfig,
    _layer_metrics,
)
from fcmoe.algorithms.fedavg import FedAvg, FedAvgConfig
from fcmoe.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fcmoe.core import ConsensusCoefficients, tree_sub
from fcmoe.models.build import BuiltModel
from tests.helpers import make_updates, random_delta


def test_size_weights_no_projection_no_retention_equals_fedavg(tiny: BuiltModel) -> None:
    state = tiny.model.trainable_state()
    deltas = [random_delta(state, s) for s in range(4)]
    counts = [torch.tensor([3, 0, 1, 9]), torch.tensor([0, 0, 5, 1]), torch.tensor([1, 1, 1, 1]),
              torch.tensor([2, 0, 0, 0])]
    updates = make_updates(tiny, deltas, [7, 19, 3, 30], counts)
    fcmoe = FCMoE(FCMoEConfig(importance="size", tau=-1.0, retention=0.0), tiny.layout)
    fedavg = FedAvg(FedAvgConfig(), tiny.layout)
    ours, reference = fcmoe.aggregate(state, updates).global_state, fedavg.aggregate(state, updates).global_state
    for key in state:  # expert units by a batched product, FedAvg client by client: equal to float32 rounding
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-6, atol=1e-7, msg=key)


def test_unused_expert_keeps_its_value(tiny: BuiltModel) -> None:
    state = tiny.model.trainable_state()
    counts = [torch.tensor([3, 0, 1, 9]), torch.tensor([2, 0, 5, 1])]
    updates = make_updates(tiny, [random_delta(state, s) for s in range(2)], [5, 5], counts)
    new = FCMoE(FCMoEConfig(), tiny.layout).aggregate(state, updates).global_state
    layer = tiny.layout.layers[0]
    for key in [part.keys[1] for part in layer.parts]:
        assert torch.equal(new[key], state[key]), key
    assert not torch.equal(new[layer.parts[0].keys[0]], state[layer.parts[0].keys[0]])


def test_frequency_weighting_favours_the_heavy_user(tiny: BuiltModel) -> None:
    """Client 0 routes 90 % of its tokens to expert 0: with scheme 'freq' its update dominates expert 0."""
    state = tiny.model.trainable_state()
    layer = tiny.layout.layers[0]
    d0, d1 = random_delta(state, 0), random_delta(state, 1)
    counts = [torch.tensor([90, 10, 0, 0]), torch.tensor([10, 90, 0, 0])]
    updates = make_updates(tiny, [d0, d1], [10, 10], counts)
    new = FCMoE(FCMoEConfig(importance="freq", projection=False), tiny.layout).aggregate(state, updates).global_state
    key = layer.parts[0].keys[0]
    torch.testing.assert_close(new[key], state[key] + 0.9 * d0[key] + 0.1 * d1[key])


def test_conflicting_client_gets_a_residual_equal_to_what_was_removed(tiny: BuiltModel) -> None:
    state = tiny.model.trainable_state()
    layer = tiny.layout.layers[0]
    base = random_delta(state, 3)
    opposed = {k: -0.5 * v for k, v in base.items()}  # client 1 pulls against clients 0 and 2
    updates = make_updates(tiny, [base, opposed, base], [10, 10, 10])
    algo = FCMoE(FCMoEConfig(importance="size", retention=0.5), tiny.layout)
    result = algo.aggregate(state, updates)
    assert result.metrics["conflict_rate"] > 0
    states: list[dict] = [{} for _ in range(3)]
    for u in updates:
        algo.client_finish(states[u.client_id], state, result.global_state, result.messages[u.client_id])
    assert RETAINED not in states[0] and RETAINED not in states[2]
    # ρ_1 = Δ_1 − Δ̃_1 = ⟨Δ_1, g⟩/‖g‖² g with g = (Δ + Δ − 0.5Δ)/3 = 0.5Δ → ρ_1 = −0.5Δ = Δ_1 (fully opposed)
    key = layer.parts[0].keys[0]
    torch.testing.assert_close(algo.retained(states[1])[key], opposed[key], rtol=1e-4, atol=1e-6)
    # re-anchoring: the next start of client 1 is θ + λ ρ_1
    start = algo.client_start(result.global_state, states[1])
    torch.testing.assert_close(start[key], result.global_state[key] + 0.5 * opposed[key], rtol=1e-4, atol=1e-6)
    # the projected aggregate dropped client 1's opposing component: experts moved by (2/3)·Δ
    torch.testing.assert_close(tree_sub(result.global_state, state)[key], (2 / 3) * base[key], rtol=1e-4, atol=1e-6)


def test_messages_are_one_scalar_per_layer_and_expert(tiny: BuiltModel) -> None:
    state = tiny.model.trainable_state()
    updates = make_updates(tiny, [random_delta(state, s) for s in range(3)], [1, 2, 3])
    result = FCMoE(FCMoEConfig(), tiny.layout).aggregate(state, updates)
    for message in result.messages.values():
        assert set(message) == {s.name for s in tiny.layout.layers}
        assert all(v.shape == (s.num_experts,) for s, v in zip(tiny.layout.layers, message.values(), strict=True))


@pytest.mark.parametrize(("field", "value", "match"), [
    ("tau", 0.5, "tau"), ("retention", -1.0, "retention"), ("importance", "nope", "importance"),
    ("server_lr", 0.0, "server_lr"), ("decay", 2.0, "decay"),
])
def test_bad_config_names_the_field(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FCMoEConfig(**{field: value})


def test_layer_metrics_count_only_the_experts_someone_used() -> None:
    weights = torch.tensor([[0.25, 1.0, 0.0], [0.75, 0.0, 0.0]])  # [N=2, E=3]; nobody used expert 2
    conflicted = torch.tensor([[True, False, False], [False, False, False]])
    cosine = torch.tensor([[-0.5, 0.9, 0.3], [0.7, 0.0, 0.3]])  # the unused column must not count
    coeffs = ConsensusCoefficients(torch.zeros(3, 4), torch.zeros(2, 3), conflicted, cosine, torch.ones(3))
    rate, mean_cos, projected = _layer_metrics(weights, coeffs.conflicted, coeffs.cosine)
    assert rate == pytest.approx(1 / 4)  # 1 of the 4 (client, used expert) pairs
    assert mean_cos == pytest.approx((-0.5 + 0.9 + 0.7 + 0.0) / 4)
    assert projected == pytest.approx(0.25 / 2.0)  # weight on the projected pair / all weight (2 used experts)
    nobody = _layer_metrics(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool), cosine)
    assert nobody == (0.0, 0.0, 0.0)


def test_projected_weight_share_is_reported(tiny: BuiltModel) -> None:
    state = tiny.model.trainable_state()
    base = random_delta(state, 3)
    opposed = {k: -0.5 * v for k, v in base.items()}
    updates = make_updates(tiny, [base, opposed, base], [10, 10, 10])
    metrics = FCMoE(FCMoEConfig(importance="size"), tiny.layout).aggregate(state, updates).metrics
    # client 1 (weight 1/3 on every expert) is projected everywhere
    assert all(abs(v - 1 / 3) < 1e-6 for v in metrics["projected_weight_share_per_layer"].values())


def test_projection_step_change_is_the_known_amount(tiny: BuiltModel) -> None:
    """Δ, −0.5Δ, Δ with equal weights: g = 0.5Δ, client 1 has c = −1, so the projected step is (4/3)·g and
    projection moved the step by 1/3 of it; pairwise (PCGrad) cancels every pair, so it moves it by all of it."""
    state = tiny.model.trainable_state()
    base = random_delta(state, 3)
    updates = make_updates(tiny, [base, {k: -0.5 * v for k, v in base.items()}, base], [10, 10, 10])
    consensus = FCMoE(FCMoEConfig(importance="size"), tiny.layout).aggregate(state, updates).metrics
    assert all(v == pytest.approx(1 / 3, rel=1e-5) for v in consensus["projection_step_change_per_layer"].values())
    pairwise = FCMoE(FCMoEConfig(importance="size", reference="pairwise"), tiny.layout).aggregate(state, updates)
    assert all(v == pytest.approx(1.0, rel=1e-5)
               for v in pairwise.metrics["projection_step_change_per_layer"].values())
    off = FCMoE(FCMoEConfig(importance="size", projection=False), tiny.layout).aggregate(state, updates).metrics
    assert all(v == 0.0 for v in off["projection_step_change_per_layer"].values())


def test_retention_ratio_is_the_residual_next_to_the_update(tiny: BuiltModel) -> None:
    """Client 0 trained from θ + λ r with r = 2Δ_0 on the experts, λ = 0.5: ‖λ r‖ / ‖Δ_0‖ = 1; client 1 has no
    residual (0): the layer's mean is 0.5. Without retention nothing is reported."""
    state = tiny.model.trainable_state()
    deltas = [random_delta(state, s) for s in range(2)]
    updates = make_updates(tiny, deltas, [10, 10])
    residual = {}  # r = 2Δ_0 on every expert, kept as rows
    for layer in tiny.layout.layers:
        residual[layer.name + ROWS] = 2 * tiny.layout.gather_experts(deltas[0], layer)
        residual[layer.name + EXPERTS] = torch.arange(layer.num_experts)
    states = [{RETAINED: residual}, {}]
    algo = FCMoE(FCMoEConfig(retention=0.5), tiny.layout)
    for update, client_state in zip(updates, states, strict=True):
        update.statistics = algo.client_statistics(None, client_state, None, None)
    assert set(updates[0].statistics) == {f"retained_norm/{layer.name}" for layer in tiny.layout.layers}
    assert updates[1].statistics == {}
    ratios = algo.aggregate(state, updates).metrics["retention_ratio_per_layer"]
    assert set(ratios) == {layer.name for layer in tiny.layout.layers}
    assert all(v == pytest.approx(0.5, rel=1e-5) for v in ratios.values())
    silent = FCMoE(FCMoEConfig(retention=0.0), tiny.layout)
    assert silent.client_statistics(None, states[0], None, None) == {}


def _expert_zero_opposed(tiny: BuiltModel, base: dict, factor: float) -> dict:
    """``base`` with expert 0 of every MoE layer scaled by ``factor`` (the other experts as in ``base``)."""
    out = dict(base)
    for layer in tiny.layout.layers:
        rows = tiny.layout.gather_experts(base, layer).clone()
        rows[0] *= factor
        out.update(tiny.layout.split_experts(layer, rows))
    return out


def test_residuals_cost_what_they_carry_and_equal_the_dense_residual(tiny: BuiltModel, tmp_path: Path) -> None:
    """Two of five clients pull against expert 0 only. With γ = 0 each keeps one scalar per expert and a reference
    to the round's step u, the same tensor for both; r_i = s_i · u exactly. With γ > 0 the next residual keeps
    expert 0's rows only, equal to γ·r_i + s_i·u; and a checkpoint writes u once and reads it back shared."""
    state = tiny.model.trainable_state()
    base = random_delta(state, 4)
    deltas = [base, _expert_zero_opposed(tiny, base, -0.5), base, base, _expert_zero_opposed(tiny, base, -0.7)]
    updates = make_updates(tiny, deltas, [10] * 5)
    algo = FCMoE(FCMoEConfig(importance="size", decay=0.5), tiny.layout)
    result = algo.aggregate(state, updates)
    states: list[dict] = [{} for _ in range(5)]
    for u in updates:
        algo.client_finish(states[u.client_id], state, result.global_state, result.messages[u.client_id])
    assert [RETAINED in s for s in states] == [False, True, False, False, True]
    for layer in tiny.layout.layers:
        step = tiny.layout.gather_experts(result.global_state, layer) - tiny.layout.gather_experts(state, layer)  # u
        one, four = states[1][RETAINED], states[4][RETAINED]
        assert one[layer.name + STEP] is four[layer.name + STEP]  # u once for the round
        assert one[layer.name + SCALE].nonzero().flatten().tolist() == [0]
        for cid in (1, 4):
            dense = result.messages[cid][layer.name][:, None] * step  # the dense residual of before
            assert torch.equal(tiny.layout.gather_experts(algo.retained(states[cid]), layer), dense)
    # a second round with γ = 0.5: r_1 ← γ r_1 + s_1 u', kept as expert 0's rows
    before = {cid: algo.retained(states[cid]) for cid in (1, 4)}
    second = algo.aggregate(result.global_state, updates)
    for u in updates:
        algo.client_finish(states[u.client_id], result.global_state, second.global_state, second.messages[u.client_id])
    for layer in tiny.layout.layers:
        gather = tiny.layout.gather_experts
        step = gather(second.global_state, layer) - gather(result.global_state, layer)
        kept = states[1][RETAINED]
        assert kept[layer.name + EXPERTS].tolist() == [0] and kept[layer.name + ROWS].shape[0] == 1
        dense = (second.messages[1][layer.name][:, None] * step
                 + 0.5 * tiny.layout.gather_experts(before[1], layer))
        assert torch.equal(tiny.layout.gather_experts(algo.retained(states[1]), layer), dense)
    # a checkpoint of round-1 states: u written once, shared again when read
    fresh, shared = FCMoE(FCMoEConfig(importance="size"), tiny.layout), [{}, {}]
    for client_state, cid in zip(shared, (1, 4), strict=True):
        fresh.client_finish(client_state, state, result.global_state, result.messages[cid])
    save_checkpoint(tmp_path, Checkpoint("fcmoe", 1, state, shared, {}))
    written = sum(v.numel() * v.element_size() for k, v in load_file(str(tmp_path / "state-r1.safetensors")).items()
                  if k.startswith("client"))
    step_bytes = sum(tiny.layout.gather_experts(state, layer).numel() * 4 for layer in tiny.layout.layers)
    assert step_bytes <= written < 1.1 * step_bytes  # one u per layer, not one per client
    loaded = load_checkpoint(tmp_path, "fcmoe").client_states
    for layer in tiny.layout.layers:
        assert loaded[0][RETAINED][layer.name + STEP] is loaded[1][RETAINED][layer.name + STEP]
        assert torch.equal(loaded[1][RETAINED][layer.name + SCALE], shared[1][RETAINED][layer.name + SCALE])


def test_a_dense_residual_of_an_older_checkpoint_is_still_read(tiny: BuiltModel) -> None:
    """Checkpoints written before the compact residual kept r_i densely by expert key: it re-anchors the same."""
    state = tiny.model.trainable_state()
    expert_keys = {key for layer in tiny.layout.layers for key in layer.keys}
    dense = {k: v for k, v in random_delta(state, 2).items() if k in expert_keys}
    algo = FCMoE(FCMoEConfig(retention=0.5), tiny.layout)
    older = {OLDER_RETAINED: dense}  # under the key r_i had then
    assert all(torch.equal(algo.retained(older)[k], v) for k, v in dense.items())
    start = algo.client_start(state, older)
    key = next(iter(dense))
    assert torch.equal(start[key], state[key] + 0.5 * dense[key])
