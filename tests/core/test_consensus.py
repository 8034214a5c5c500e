"""Properties of the consensus projection (DESIGN §2) on random and hand-built inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fcmoe.core import (
    CoordinateMean,
    consensus_coefficients,
    consensus_project,
    consensus_step,
    expert_norms,
    normalise_columns,
    pairwise_project,
    pairwise_step,
)


def random_case(seed: int, n: int = 5, e: int = 3, p: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    deltas = torch.randn(n, e, p, generator=gen, dtype=torch.float64)
    weights = normalise_columns(torch.rand(n, e, generator=gen, dtype=torch.float64) + 0.01).double()
    return deltas, weights


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6), e=st.integers(1, 4), p=st.integers(1, 9),
       tau=st.floats(-1.0, 0.0))
def test_projection_properties(seed: int, n: int, e: int, p: int, tau: float) -> None:
    deltas, weights = random_case(seed, n, e, p)
    before = deltas.clone(), weights.clone()
    out = consensus_project(deltas, weights, tau)
    g = out.consensus
    # Δ̃ + ρ = Δ
    torch.testing.assert_close(out.projected + out.removed, deltas, rtol=0, atol=1e-12)
    # ⟨Δ̃_i, g⟩ ≥ 0 for every conflicted pair (it is 0 up to rounding); unconflicted pairs are untouched
    dots = torch.einsum("nep,ep->ne", out.projected, g)
    scale = deltas.abs().max() * g.abs().max() * p
    assert (dots[out.conflicted] >= -1e-12 * scale).all()
    assert torch.equal(out.projected[~out.conflicted], deltas[~out.conflicted])
    assert (out.removed[~out.conflicted] == 0).all()
    # conflicted means cos < τ
    assert torch.equal(out.conflicted, out.cosine < tau)
    # the aggregate is Σ_i w_i Δ̃_i
    torch.testing.assert_close(out.aggregate, torch.einsum("ne,nep->ep", weights, out.projected))
    # residuals are multiples of g: ρ_i = c_i g
    torch.testing.assert_close(out.removed, out.coefficient[:, :, None] * g[None])
    # inputs never mutated
    assert torch.equal(deltas, before[0]) and torch.equal(weights, before[1])


def test_tau_minus_one_is_the_weighted_mean() -> None:
    deltas, weights = random_case(3)
    out = consensus_project(deltas, weights, tau=-1.0)
    assert not out.conflicted.any()
    torch.testing.assert_close(out.aggregate, torch.einsum("ne,nep->ep", weights, deltas))
    assert torch.equal(out.projected, deltas)


def test_parallel_updates_are_never_projected() -> None:
    direction = torch.randn(2, 11)
    magnitudes = torch.tensor([0.5, 1.0, 3.0, 0.1])
    deltas = magnitudes[:, None, None] * direction[None]  # [4, 2, 11], all positive multiples
    weights = torch.full((4, 2), 0.25)
    out = consensus_project(deltas, weights, tau=0.0)
    assert not out.conflicted.any()
    torch.testing.assert_close(out.aggregate, deltas.mean(dim=0))


def test_opposed_update_is_projected_to_orthogonal() -> None:
    # expert 0: client 0 = (1, 0), client 1 = (-1, 1) with weights 0.75 / 0.25 → g = (0.5, 0.25)
    deltas = torch.tensor([[[1.0, 0.0]], [[-1.0, 1.0]]])
    weights = torch.tensor([[0.75], [0.25]])
    out = consensus_project(deltas, weights, tau=0.0)
    g = torch.tensor([0.5, 0.25])
    torch.testing.assert_close(out.consensus[0], g)
    assert out.conflicted.tolist() == [[False], [True]]
    c = (-1.0 * 0.5 + 1.0 * 0.25) / (0.5**2 + 0.25**2)  # ⟨Δ_1, g⟩ / ‖g‖² = -0.8
    torch.testing.assert_close(out.removed[1, 0], c * g)
    torch.testing.assert_close(out.projected[1, 0], torch.tensor([-1.0, 1.0]) - c * g)
    torch.testing.assert_close(out.aggregate[0], g * (1 - 0.25 * c))
    assert abs(float(out.projected[1, 0] @ g)) < 1e-6


def test_unused_expert_gets_zero_step_and_no_conflict() -> None:
    deltas = torch.randn(3, 2, 5)
    weights = torch.tensor([[0.5, 0.0], [0.5, 0.0], [0.0, 0.0]])
    out = consensus_coefficients(deltas, weights)
    assert torch.equal(out.consensus[1], torch.zeros(5))
    assert not out.conflicted[:, 1].any()


@pytest.mark.parametrize("bad", [torch.randn(2, 3), torch.randn(2, 3, 4, 5)])
def test_shape_errors_name_the_expected_shape(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"\[N clients, E experts, P params\]"):
        consensus_project(bad, torch.ones(2, 3))


def test_weight_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="weights must be"):
        consensus_project(torch.randn(2, 3, 4), torch.ones(3, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_step_of_each_expert_equals_a_float64_reference_and_accumulates_bf16_in_fp32(dtype: torch.dtype) -> None:
    """consensus_step, expert by expert: g, c, cos and scale against float64 arithmetic written out from the paper's
    step 3, on a layer with an unused expert and a certain conflict; the batched form agrees."""
    gen = torch.Generator().manual_seed(7)
    deltas = torch.randn(5, 4, 1000, generator=gen).to(dtype)  # [N, E, P]
    deltas[1] = -0.5 * deltas[0]  # a conflicted pair for certain
    weights = normalise_columns(torch.rand(5, 4, generator=gen) * torch.tensor([1.0, 1.0, 0.0, 1.0]))
    steps = [consensus_step(deltas[:, k], weights[:, k], 0.0) for k in range(4)]
    consensus, scale = torch.stack([s.direction for s in steps]), torch.stack([s.scale for s in steps])
    cosine, coefficient, conflicted = (torch.stack([getattr(s, f) for s in steps], dim=1)
                                       for f in ("cosine", "removed", "conflicted"))
    d, w = deltas.double(), weights.double()
    g = torch.einsum("ne,nep->ep", w, d)  # [E, P]
    dots = torch.einsum("nep,ep->ne", d, g)
    cos = torch.nan_to_num(dots / (d.norm(dim=-1) * g.norm(dim=-1)[None]), nan=0.0)
    c = torch.where(cos < 0, dots / g.square().sum(dim=-1).clamp_min(1e-300)[None], 0.0)
    assert consensus.dtype == torch.promote_types(dtype, torch.float32)
    assert torch.equal(conflicted, cos < 0) and conflicted[1].any() and not conflicted[:, 2].any()
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(consensus.double(), g, **tol)
    torch.testing.assert_close(cosine.double(), cos, **tol)
    torch.testing.assert_close(coefficient.double(), c, **tol)
    torch.testing.assert_close(scale.double(), 1 - (w * c).sum(dim=0), **tol)
    torch.testing.assert_close(expert_norms(deltas).double(), d.norm(dim=-1), **tol)
    batched = consensus_coefficients(deltas, weights, 0.0)
    torch.testing.assert_close(batched.consensus, consensus, rtol=1e-6, atol=1e-6)
    assert torch.equal(batched.conflicted, conflicted)


def test_a_given_mean_and_given_norms_are_what_the_step_measures_against() -> None:
    gen = torch.Generator().manual_seed(3)
    deltas, weights = torch.randn(5, 40, generator=gen), torch.full((5,), 0.2)
    plain = consensus_step(deltas, weights, 0.0)
    halved = consensus_step(deltas, weights, 0.0, norms=2 * expert_norms(deltas))
    torch.testing.assert_close(halved.cosine, plain.cosine / 2)
    robust = consensus_step(deltas, weights, 0.0, CoordinateMean("median"))
    assert torch.equal(robust.direction, deltas.median(dim=0).values)
    expected = deltas @ robust.direction / (deltas.norm(dim=1) * robust.direction.norm())
    torch.testing.assert_close(robust.cosine, expected)


def test_the_pairwise_step_is_the_mean_of_pcgrads_projections_and_keeps_what_they_removed() -> None:
    gen = torch.Generator().manual_seed(5)
    deltas = torch.randn(4, 30, generator=gen)
    deltas[2] = -deltas[0] + 0.1 * deltas[3]  # a conflict for certain
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4])
    projection = pairwise_project(deltas)
    step = pairwise_step(deltas, weights, 0.0)
    torch.testing.assert_close(step.direction, weights @ projection.projected)
    assert step.scale == 1 and torch.equal(step.conflicted, projection.conflicted) and step.conflicted.any()
    torch.testing.assert_close(step.removed, (deltas - projection.projected)[projection.conflicted])
    torch.testing.assert_close(step.unprojected, weights @ deltas)
    assert torch.equal(pairwise_step(deltas, weights, -1.0).direction, step.direction)  # τ is not PCGrad's rule
    off = pairwise_step(deltas, weights, None)
    assert not off.conflicted.any() and off.removed.shape == (0, 30)
    torch.testing.assert_close(off.direction, weights @ deltas)
