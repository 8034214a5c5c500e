"""The baselines against their published definitions on hand-built updates (BASELINES.md): FedMoE with sub-MoEs,
HFedMoE, local experts and FC-MoE's pairwise (PCGrad) ablation."""

from __future__ import annotations

import dataclasses

import torch

from fcmoe.algorithms.base import AlgorithmConfig
from fcmoe.algorithms.fcmoe import FCMoE, FCMoEConfig
from fcmoe.algorithms.fedavg import FedAvg, FedAvgConfig
from fcmoe.algorithms.fedmoe import MASK, VAL_ACC, FedMoE, FedMoEConfig
from fcmoe.algorithms.hfedmoe import SCORES, HFedMoE, HFedMoEConfig
from fcmoe.algorithms.localexperts import LocalExperts
from fcmoe.core import pairwise_project, tree_add
from fcmoe.core.submoe import experts_reaching, largest_threshold, recommend_experts
from fcmoe.models.build import BuiltModel
from tests.helpers import build_family, make_updates, random_delta


def _expert_keys(layer, k: int) -> list[str]:  # noqa: ANN001
    return [part.keys[k] for part in layer.parts]


# ---------------------------------------------------------------------------------------------- FedMoE, sub-MoEs
def test_binary_search_returns_the_largest_feasible_threshold() -> None:
    """Against a dense scan of θ: the sets at θ* fit the budget, and any larger θ needs more experts."""
    generator = torch.Generator().manual_seed(0)
    for trial in range(30):
        p = torch.rand(3, 6, generator=generator) ** 3  # skewed, like real routing
        p = p / p.sum(dim=1, keepdim=True)
        budget = 3 + trial % 10
        theta, mask = largest_threshold(p.double(), budget)
        assert int(mask.sum()) <= budget and torch.equal(mask, experts_reaching(p.double(), theta))
        assert (mask.sum(dim=1) >= 1).all()
        for larger in torch.linspace(theta, 1.0, 200)[1:].tolist():
            if larger > theta + 1e-9:
                assert int(experts_reaching(p.double(), larger).sum()) > budget, (trial, theta, larger)


def test_experts_reaching_takes_the_smallest_prefix_by_descending_share() -> None:
    p = torch.tensor([[0.1, 0.6, 0.3, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert experts_reaching(p, 0.6).tolist() == [[False, True, False, False], [True, True, True, False]]
    assert experts_reaching(p, 0.0).sum(dim=1).tolist() == [1, 1]  # at least one per layer
    assert experts_reaching(p, 1.0)[0].tolist() == [True, True, True, False]  # an unused expert is never needed


def test_recommendation_adds_what_similar_clients_use_and_drops_keeping_one_per_layer() -> None:
    mask = torch.tensor([[True, False, False, False], [True, False, False, False]])
    p = torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.8, 0.0, 0.2, 0.0]])
    others = torch.stack([torch.tensor([[0.5, 0.0, 0.4, 0.1], [0.6, 0.0, 0.4, 0.0]]),
                          torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])])  # the second is dissimilar
    grown = recommend_experts(mask, p, others, torch.tensor([4, 2]), similar=1)  # follow client 0: 4 experts
    assert grown.tolist() == [[True, False, True, False], [True, False, True, False]]  # its top two unheld
    shrunk = recommend_experts(torch.ones(2, 4, dtype=torch.bool), p, others[:1], torch.tensor([3]), similar=1)
    assert int(shrunk.sum()) == 3 and (shrunk.sum(dim=1) >= 1).all()
    assert not shrunk[1, 1]  # p̂ = 0 for layer 1's expert 1: the least used goes first


def _fedmoe_round(algo: FedMoE, tiny: BuiltModel, state: dict, deltas: list, counts: list[torch.Tensor],
                  accs: list[float] | None = None) -> dict:
    updates = make_updates(tiny, deltas, [10, 30], counts)
    for update, acc in zip(updates, accs, strict=True) if accs else ():
        update.statistics[VAL_ACC] = torch.tensor(acc, dtype=torch.float64)
    return algo.aggregate(state, updates)


def test_fedmoe_holder_copies_and_unheld_experts_are_kept(tiny: BuiltModel) -> None:
    """Budget 0.25 of 8 experts = 2: one per layer. After stage 1, client 0 holds expert 0 of every layer and
    client 1 expert 2; in round 2 expert 0 is client 0's copy, expert 2 client 1's, experts 1 and 3 keep their
    values, router rows likewise, and the shared parameters are FedAvg."""
    state = tiny.model.trainable_state()
    algo = FedMoE(FedMoEConfig(recommend=False), tiny.layout)
    counts = [torch.tensor([9, 1, 0, 0]), torch.tensor([0, 1, 9, 0])]
    first = _fedmoe_round(algo, tiny, state, [random_delta(state, 0), random_delta(state, 1)], counts)
    assert [first.messages[c][tiny.layout.layers[0].name].tolist() for c in (0, 1)] == [[1, 0, 0, 0], [0, 0, 1, 0]]
    d0, d1 = random_delta(state, 2), random_delta(state, 3)
    new = _fedmoe_round(algo, tiny, state, [d0, d1], counts).global_state
    for layer in tiny.layout.layers:
        for k, expected in ((0, tree_add(state, d0)), (1, state), (2, tree_add(state, d1)), (3, state)):
            for key in _expert_keys(layer, k):
                torch.testing.assert_close(new[key], expected[key])
        router = layer.router_keys[0]
        torch.testing.assert_close(new[router][0], state[router][0] + d0[router][0])
        torch.testing.assert_close(new[router][1], state[router][1])
    shared = tiny.layout.shared_keys[0]
    torch.testing.assert_close(new[shared], state[shared] + 0.25 * d0[shared] + 0.75 * d1[shared])


def test_a_budget_of_every_expert_is_fedmoe_agg(tiny: BuiltModel) -> None:
    """ρ = 1 holds every expert that was used (θ = 1), so from round 2 on it aggregates as FedMoE-Agg."""
    state = tiny.model.trainable_state()
    counts = [torch.tensor([5, 0, 2, 1]), torch.tensor([1, 3, 7, 0])]
    full = FedMoE(FedMoEConfig(budget=1.0, recommend=False), tiny.layout)
    _fedmoe_round(full, tiny, state, [random_delta(state, 0), random_delta(state, 1)], counts)
    deltas = [random_delta(state, 2), random_delta(state, 3)]
    published = _fedmoe_round(full, tiny, state, deltas, counts).global_state
    agg = _fedmoe_round(FedMoE(FedMoEConfig(sub_models=False, recommend=False), tiny.layout), tiny, state, deltas,
                        counts).global_state
    assert all(torch.equal(published[k], agg[k]) for k in state)


def test_a_masked_expert_gets_no_gradient_and_no_token(tiny: BuiltModel) -> None:
    from fcmoe.models.routing import RoutingRecorder, masked_routing

    model, layout = tiny.model, tiny.layout
    mask = {layer.name: torch.tensor([1.0, 0.0, 1.0, 0.0]) for layer in layout.layers}
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(4, 16, model.config.hidden_size, generator=generator)
    attention = torch.ones(4, 16, dtype=torch.long)
    recorder = RoutingRecorder(model, layout)
    model.zero_grad()
    with masked_routing(model, layout, mask), recorder.recording(attention):
        model(features, attention).sum().backward()
    names = dict(model.named_parameters())
    for layer in layout.layers:
        assert recorder.counts[layer.name][[1, 3]].sum() == 0 and recorder.counts[layer.name].sum() > 0
        for k in (1, 3):
            assert all(names[key].grad is None or not names[key].grad.any() for key in _expert_keys(layer, k))
        router_grad = names[layer.router_keys[0]].grad
        assert not router_grad[[1, 3]].any() and router_grad[[0, 2]].any()
    recorder.reset()
    with recorder.recording(attention), torch.no_grad():  # outside the block the mask is gone
        model(features, attention)
    assert any(recorder.counts[layer.name][[1, 3]].sum() > 0 for layer in layout.layers)
    recorder.close()


def test_recommendation_reverts_and_freezes_when_the_next_participation_is_not_better(tiny: BuiltModel) -> None:
    state = tiny.model.trainable_state()
    algo = FedMoE(FedMoEConfig(budget=0.5, patience=1, similar_clients=1), tiny.layout)
    counts = [torch.tensor([10, 0, 0, 0]), torch.tensor([4, 3, 2, 1])]  # client 1 spreads: it gets more experts
    deltas = [random_delta(state, 0), random_delta(state, 1)]
    _fedmoe_round(algo, tiny, state, deltas, counts, accs=[0.5, 0.5])
    before = algo.clients[0].mask.clone()
    step = _fedmoe_round(algo, tiny, state, deltas, counts, accs=[0.4, 0.6])  # client 0 got worse: recommend
    assert step.metrics["recommendations"] == 1  # client 1 holds 4 experts, client 0 2: it adds 2 of client 1's
    assert algo.clients[0].mask.tolist() == [[True, True, False, False]] * 2 and before.sum() == 2
    step = _fedmoe_round(algo, tiny, state, deltas, counts, accs=[0.45, 0.7])  # still below its best 0.5: revert
    assert step.metrics["reverts"] == 1 and torch.equal(algo.clients[0].mask, before) and algo.clients[0].frozen
    restored = FedMoE(algo.config, tiny.layout)
    restored.load_server_state(algo.server_state())
    assert restored.clients.keys() == algo.clients.keys()
    for cid, record in algo.clients.items():
        twin = restored.clients[cid]
        assert torch.equal(twin.mask, record.mask) and twin.frozen == record.frozen and twin.stale == record.stale


def test_fedmoe_on_a_top2_model_gives_every_sub_moe_two_experts_per_layer() -> None:
    """Budget 0.25 of 8 experts would be 2 (one per layer); a top-2 router needs 2 per layer: 4, one of each
    client's most used experts and the next in its p."""
    fused = build_family("qwen3_moe-tiny", "full")
    state = fused.model.trainable_state()
    algo = FedMoE(FedMoEConfig(recommend=False), fused.layout)
    assert algo.budget == 4
    counts = [torch.tensor([9, 1, 0, 0]), torch.tensor([0, 1, 9, 0])]
    first = _fedmoe_round(algo, fused, state, [random_delta(state, 0), random_delta(state, 1)], counts)
    layer = fused.layout.layers[0].name
    assert [first.messages[c][layer].tolist() for c in (0, 1)] == [[1, 1, 0, 0], [0, 1, 1, 0]]


def test_the_client_trains_and_deploys_its_sub_moe(tiny: BuiltModel) -> None:
    algo = FedMoE(FedMoEConfig(), tiny.layout)
    state: dict = {}
    message = {layer.name: torch.tensor([0.0, 1.0, 0.0, 0.0]) for layer in tiny.layout.layers}
    algo.client_finish(state, {}, {}, message)
    assert set(algo.client_expert_mask(state)) == {layer.name for layer in tiny.layout.layers} and MASK in state


# ---------------------------------------------------------------------------------------------- HFedMoE
def _scored(updates: list, usage: list[torch.Tensor], score: list[torch.Tensor]) -> list:
    for update, u, s in zip(updates, usage, score, strict=True):
        update.statistics.update({SCORES + layer: torch.stack([u, s, s]) for layer in update.routing_counts})
    return updates


def test_hfedmoe_tau_zero_and_equal_importances_is_fedavg(tiny: BuiltModel) -> None:
    state = tiny.model.trainable_state()
    deltas = [random_delta(state, s) for s in range(3)]
    usage = [torch.tensor([0.7, 0.1, 0.1, 0.1]), torch.tensor([0.05, 0.05, 0.45, 0.45]), torch.full((4,), 0.25)]
    equal = [0.25 / u for u in usage]  # p_i(e) = u·s = 0.25 for every client and expert: equal α_i
    updates = _scored(make_updates(tiny, deltas, [10, 10, 10]), usage, equal)
    new = HFedMoE(HFedMoEConfig(usage_share=0.0), tiny.layout).aggregate(state, updates).global_state
    reference = FedAvg(FedAvgConfig(), tiny.layout).aggregate(state, updates).global_state
    for key in state:  # experts: every client above τ = 0; routers: equal α and equal n
        torch.testing.assert_close(new[key], reference[key])
    skewed = _scored(make_updates(tiny, deltas, [10, 10, 10]), usage, usage)  # unequal importances move the router
    router = tiny.layout.router_keys[0]
    assert not torch.allclose(HFedMoE(HFedMoEConfig(usage_share=0.0), tiny.layout).aggregate(state, skewed)
                              .global_state[router], reference[router])


def test_hfedmoe_an_expert_under_tau_everywhere_is_kept(tiny: BuiltModel) -> None:
    state = tiny.model.trainable_state()
    deltas = [random_delta(state, s) for s in range(2)]
    usage = [torch.tensor([0.6, 0.05, 0.2, 0.15]), torch.tensor([0.3, 0.1, 0.0, 0.6])]  # τ = 0.125
    updates = _scored(make_updates(tiny, deltas, [10, 30]), usage, usage)
    new = HFedMoE(HFedMoEConfig(), tiny.layout).aggregate(state, updates).global_state
    layer = tiny.layout.layers[0]
    for key in _expert_keys(layer, 1):  # 0.05 and 0.1 < τ: kept
        assert torch.equal(new[key], state[key])
    for key in _expert_keys(layer, 2):  # only client 0 is above τ: its copy
        torch.testing.assert_close(new[key], state[key] + deltas[0][key])
    for key in _expert_keys(layer, 0):  # both: the n-weighted mean
        torch.testing.assert_close(new[key], state[key] + 0.25 * deltas[0][key] + 0.75 * deltas[1][key])
    router = layer.router_keys[0]
    # p_i(e) = u·s = u² here; α_i = Σ over its experts above τ / |experts above τ for someone| = 3 (0, 2, 3)
    alpha = torch.tensor([(u * u)[u >= 0.125].sum().item() / 3 for u in usage])
    expected = state[router] + (alpha[0] * deltas[0][router] + alpha[1] * deltas[1][router]) / alpha.sum()
    torch.testing.assert_close(new[router], expected)
    literal = HFedMoE(HFedMoEConfig(normalise=False), tiny.layout).aggregate(state, updates).global_state
    torch.testing.assert_close(literal[router], alpha.sum() * expected)


# ---------------------------------------------------------------------------------------------- local experts
def test_local_experts_upload_no_expert_and_the_global_experts_never_change(tiny: BuiltModel) -> None:
    algo = LocalExperts(AlgorithmConfig(), tiny.layout)
    state = tiny.model.trainable_state()
    client: dict = {}
    trained = tree_add(state, random_delta(state, 0))
    update = make_updates(tiny, [random_delta(state, 1)], [10])[0]
    sent = algo.prepare_upload(client, update, trained)
    private = set(tiny.layout.expert_keys) | set(tiny.layout.router_keys)
    assert private and not private & set(sent.delta) and set(sent.delta) == set(algo.upload_keys(state))
    assert all(torch.equal(client["local_experts"][k], trained[k]) for k in private)  # kept on the client
    new = algo.aggregate(state, [sent, algo.prepare_upload({}, make_updates(tiny, [random_delta(state, 2)], [5])[0],
                                                           trained)]).global_state
    assert all(torch.equal(new[k], state[k]) for k in private)
    assert any(not torch.equal(new[k], state[k]) for k in tiny.layout.shared_keys)
    start = algo.client_start(new, client)  # the personalised model: the global shared part, its own experts
    assert all(torch.equal(start[k], trained[k]) for k in private)
    assert all(torch.equal(start[k], new[k]) for k in tiny.layout.shared_keys)


# ---------------------------------------------------------------------------------------------- pairwise projection
def test_pairwise_projection_leaves_orthogonal_updates_untouched() -> None:
    deltas = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, -3.0]])
    out = pairwise_project(deltas)
    assert torch.equal(out.projected, deltas) and not out.conflicted.any()


def test_two_opposite_updates_are_projected_exactly_as_pcgrad() -> None:
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # ⟨a, b⟩ = −1
    out = pairwise_project(torch.stack([a, b]))
    pcgrad_a = a - (a @ b) / (b @ b) * b  # (0.5, 0.5)
    pcgrad_b = b - (b @ a) / (a @ a) * a  # (0, 1)
    torch.testing.assert_close(out.projected, torch.stack([pcgrad_a, pcgrad_b]))
    assert out.conflicted.tolist() == [True, True]


def test_pairwise_equals_sequential_pcgrad_on_many_clients() -> None:
    generator = torch.Generator().manual_seed(1)
    deltas = torch.randn(5, 7, generator=generator)
    expected = []
    for i in range(5):
        g = deltas[i].clone()
        for j in range(5):
            if j != i and g @ deltas[j] < 0:
                g = g - (g @ deltas[j]) / (deltas[j] @ deltas[j]) * deltas[j]
        expected.append(g)
    torch.testing.assert_close(pairwise_project(deltas).projected, torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_fcmoe_pairwise_aggregates_the_projected_updates_and_sends_what_was_removed(tiny: BuiltModel) -> None:
    state = tiny.model.trainable_state()
    layer = tiny.layout.layers[0]
    base = random_delta(state, 0)
    deltas = [base, {k: -0.5 * v + 0.01 * random_delta(state, 1)[k] for k, v in base.items()}]
    updates = make_updates(tiny, deltas, [10, 10])
    config = dataclasses.replace(FCMoEConfig(importance="size"), reference="pairwise")
    algo = FCMoE(config, tiny.layout)
    result = algo.aggregate(state, updates)
    rows = [tiny.layout.gather_experts(d, layer)[0] for d in deltas]  # expert 0: [P] each
    projected = pairwise_project(torch.stack(rows)).projected
    step = tiny.layout.gather_experts(result.global_state, layer)[0] - tiny.layout.gather_experts(state, layer)[0]
    torch.testing.assert_close(step, projected.mean(dim=0), rtol=1e-4, atol=1e-6)
    client: dict = {}
    algo.client_finish(client, state, result.global_state, result.messages[0])
    residual = tiny.layout.gather_experts(algo.retained(client), layer)[0]
    torch.testing.assert_close(residual, rows[0] - projected[0], rtol=1e-4, atol=1e-6)


def test_statistics_and_an_expertless_sparse_upload_survive_the_flower_codec(tiny: BuiltModel) -> None:
    """FedMoE's and HFedMoE's statistics travel with the update; a local-experts upload, sparse, stays expertless."""
    from fcmoe.fl.codec import decode_update, encode_update
    from fcmoe.rounds import sparsify

    state = tiny.model.trainable_state()
    update = make_updates(tiny, [random_delta(state, 0)], [4])[0]
    layer = tiny.layout.layers[0].name
    update.statistics = {VAL_ACC: torch.tensor(0.5, dtype=torch.float64), SCORES + layer: torch.rand(3, 4)}
    back = decode_update(encode_update(update, tiny.layout), tiny.layout)
    assert back.statistics.keys() == update.statistics.keys()
    assert all(torch.equal(back.statistics[k], v) for k, v in update.statistics.items())
    algo = LocalExperts(AlgorithmConfig(), tiny.layout)
    sent = sparsify(algo.prepare_upload({}, update, state), tiny.layout)
    back = decode_update(encode_update(sent, tiny.layout), tiny.layout)
    assert set(back.delta) == set(algo.upload_keys(state))
