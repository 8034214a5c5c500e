"""FedMoE's sub-MoE choice and expert recommendation (Mei et al. 2024, arXiv 2408.11304), as plain tensor math.

p ``[L, E]``: a client's activation frequencies p_{l,e} (each row sums to 1, or 0 for a layer that saw no token).
A sub-MoE is a mask ``[L, E]`` (True = the client holds expert e of layer l), at least ``least`` experts per layer:
one on the paper's top-1 Switch, k on a top-k model (its router chooses k distinct experts per token).
"""

from __future__ import annotations

import torch


def experts_reaching(p: torch.Tensor, theta: float, least: int = 1) -> torch.Tensor:
    """``[L, E]`` bool: per layer, the smallest set of experts, taken by descending p, whose p sums to at least θ
    (always at least the ``least`` most used experts; every expert when the layer's p never reaches θ)."""
    order = p.argsort(dim=1, descending=True, stable=True)  # [L, E]
    sorted_p = p.gather(1, order)
    running = sorted_p.cumsum(dim=1)
    before = torch.cat([torch.zeros_like(running[:, :1]), running[:, :-1]], dim=1)  # [L, E]: mass taken before
    take = before < theta
    take[:, :least] = True
    return torch.zeros_like(take).scatter(1, order, take)


def largest_threshold(p: torch.Tensor, budget: int, least: int = 1) -> tuple[float, torch.Tensor]:
    """FedMoE stage 1: the largest θ ∈ [0, 1] whose :func:`experts_reaching` sets fit ``budget`` experts in all
    layers together, and those sets.

    The number of experts needed is a non-decreasing step function of θ that only steps just after a cumulative
    sum of some layer's sorted p, so the supremum of the feasible θ is one of those sums (or 1): a binary search
    over them is exact. ``budget`` must be at least ``least`` · L (what θ = 0 gives).
    """
    layers = p.shape[0]
    if budget < least * layers:
        raise ValueError(f"an expert budget of {budget} cannot hold {least} expert(s) in each of {layers} layers")
    sorted_p = p.sort(dim=1, descending=True).values
    candidates = torch.cat([sorted_p.cumsum(dim=1).flatten().clamp(0, 1), torch.tensor([0.0, 1.0], dtype=p.dtype)])
    candidates = candidates.unique()  # ascending
    lo, hi = 0, candidates.numel() - 1  # candidates[lo] = 0 is feasible
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if int(experts_reaching(p, float(candidates[mid]), least).sum()) <= budget:
            lo = mid
        else:
            hi = mid - 1
    theta = float(candidates[lo])
    return theta, experts_reaching(p, theta, least)


def recommend_experts(mask: torch.Tensor, p: torch.Tensor, others_p: torch.Tensor, others_counts: torch.Tensor,
                      similar: int, least: int = 1) -> torch.Tensor:
    """FedMoE's expert recommendation for one client: a new mask ``[L, E]``.

    Parameters
    ----------
    mask, p
        The client's sub-MoE and activation frequencies, ``[L, E]``.
    others_p, others_counts
        The other clients' latest frequencies ``[M, L, E]`` and expert counts ``[M]`` (as the server cached them).
    similar
        K: how many of the most similar clients (cosine of the flattened p) to follow.

    With S' the K most similar clients, n = round(mean count of S' − own count) and p̂ the similarity-weighted mean
    of their p: for n > 0 add the n unheld experts of highest p̂ (ranked across layers); for n < 0 drop |n| held
    experts of lowest p̂, keeping ``least`` per layer. Ties go to the lower (layer, expert) index.
    """
    if others_p.shape[0] == 0:
        return mask.clone()
    flat = p.flatten().double()
    others = others_p.flatten(1).double()  # [M, L·E]
    similarity = torch.nn.functional.cosine_similarity(others, flat[None, :], dim=1)  # [M]
    top = similarity.topk(min(similar, others.shape[0])).indices.sort().values
    weights = similarity[top].clamp_min(0)
    estimate = (weights[:, None] * others[top]).sum(dim=0) / weights.sum().clamp_min(1e-12)  # [L·E]  p̂
    change = round(others_counts[top].double().mean().item() - int(mask.sum()))
    new = mask.clone().flatten()
    if change > 0:
        candidates = [i for i in estimate.argsort(descending=True, stable=True).tolist() if not new[i]]
        new[candidates[:change]] = True
    elif change < 0:
        per_layer = mask.sum(dim=1).tolist()
        experts = mask.shape[1]
        for i in estimate.argsort(stable=True).tolist():
            if change == 0:
                break
            if new[i] and per_layer[i // experts] > least:
                new[i] = False
                per_layer[i // experts] -= 1
                change += 1
    return new.reshape(mask.shape)
