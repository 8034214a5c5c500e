"""Property test: random malformed updates never crash the server, never produce NaN, never move the model."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fcmoe.algorithms import ClientUpdate
from fcmoe.algorithms.fcmoe import FCMoE, FCMoEConfig
from fcmoe.algorithms.fedavg import FedAvg, FedAvgConfig
from fcmoe.algorithms.robust import screen_updates
from tests.helpers import tiny_model

BUILT = tiny_model()
STATE = BUILT.model.trainable_state()
LAYERS = {spec.name: spec.num_experts for spec in BUILT.layout.layers}
KEYS = sorted(STATE)

corruptions = st.sampled_from(["nan", "inf", "drop_key", "extra_key", "shape", "int_dtype", "scale", "counts",
                               "no_counts", "zero_samples", "none"])


def _update(client: int, seed: int, corruption: str) -> ClientUpdate:
    gen = torch.Generator().manual_seed(seed)
    delta = {k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in STATE.items()}
    counts = {name: torch.randint(1, 50, (e,), generator=gen) for name, e in LAYERS.items()}
    samples = 10
    key = KEYS[seed % len(KEYS)]
    if corruption == "nan":
        delta[key] = delta[key].clone().view(-1).index_fill(0, torch.tensor([0]), float("nan")).view(delta[key].shape)
    elif corruption == "inf":
        delta[key] = torch.full_like(delta[key], float("inf"))
    elif corruption == "drop_key":
        del delta[key]
    elif corruption == "extra_key":
        delta["not.a.parameter"] = torch.zeros(2)
    elif corruption == "shape":
        delta[key] = torch.zeros(delta[key].numel() + 1)
    elif corruption == "int_dtype":
        delta[key] = delta[key].to(torch.int32)
    elif corruption == "scale":
        delta = {k: v * 1e6 for k, v in delta.items()}
    elif corruption == "counts":
        counts[next(iter(counts))] = torch.tensor([-1] * LAYERS[next(iter(counts))])
    elif corruption == "no_counts":
        counts.pop(next(iter(counts)))
    elif corruption == "zero_samples":
        samples = 0
    return ClientUpdate(client, delta, samples, counts)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=st.lists(st.tuples(corruptions, st.integers(0, 10_000)), min_size=1, max_size=6),
       fcmoe=st.booleans())
def test_random_malformed_updates_never_crash_never_nan_never_leak(plan: list[tuple[str, int]], fcmoe: bool) -> None:
    updates = [_update(i, seed, corruption) for i, (corruption, seed) in enumerate(plan)]
    algo = FCMoE(FCMoEConfig(), BUILT.layout) if fcmoe else FedAvg(FedAvgConfig(), BUILT.layout)
    accepted, rejected = screen_updates(updates, STATE, BUILT.layout, max_norm_ratio=10.0)
    assert len(accepted) + len(rejected) == len(updates)
    kept = {u.client_id for u in accepted}
    kinds = [corruption for corruption, _ in plan]
    assert all(i not in kept for i, kind in enumerate(kinds) if kind not in ("none", "scale"))  # always caught
    assert all(i in kept for i, kind in enumerate(kinds) if kind == "none")  # honest updates are never rejected
    if kinds.count("none") >= 2 and kinds.count("none") > kinds.count("scale"):  # honest majority: the median is
        assert all(i not in kept for i, kind in enumerate(kinds) if kind == "scale")  # honest, 10^6 × is caught
    if not accepted:
        return  # the engines keep the global model (tested in tests/sim/test_reliability.py)
    # screening lets through exactly what the plan built as acceptable, unaltered (no rejected update, no clean-up
    # of a kept one), and the aggregate leaves the global model it started from as it was
    rebuilt = [_update(i, seed, kind) for i, (kind, seed) in enumerate(plan) if i in kept]
    for got, built in zip(accepted, rebuilt, strict=True):
        assert got.client_id == built.client_id and got.num_samples == built.num_samples
        assert got.delta.keys() == built.delta.keys() and all(torch.equal(got.delta[k], built.delta[k])
                                                               for k in built.delta)
    before = {k: v.clone() for k, v in STATE.items()}
    new = algo.aggregate(STATE, accepted).global_state
    assert all(torch.isfinite(v).all() for v in new.values())
    assert all(torch.equal(STATE[k], before[k]) for k in STATE)
