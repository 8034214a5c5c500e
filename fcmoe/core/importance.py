"""Per-expert importance weights (FC-MoE step 2, the paper's c_{i,l,k} and w_{i,l,k}).

For one MoE layer with N clients and E experts (or one expert unit, ``[N]``):

    a_{i,k} = score(n_i, f_{i,k}, ‖Δ_{i,k}‖)           # [N, E] importance score (the paper's c; fcmoe keeps c for
                                                        # the projection coefficient of step 3)
    w_{i,k} = a_{i,k} / Σ_j a_{j,k}                       # [N, E], columns sum to 1 (or 0: nobody used k)

An expert whose column of scores is all zero (no client routed a token to it under a frequency-based scheme)
gets all-zero weights; callers keep that expert's value unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch

ImportanceScheme = Literal["size", "freq", "norm", "freq_norm", "size_freq_norm"]
IMPORTANCE_SCHEMES: tuple[str, ...] = ("size", "freq", "norm", "freq_norm", "size_freq_norm")


def importance_scores(
    scheme: str,
    num_samples: torch.Tensor,
    frequencies: torch.Tensor,
    update_norms: torch.Tensor,
) -> torch.Tensor:
    """Importance score a_{i,k} of client i for expert k.

    Parameters
    ----------
    scheme
        One of ``IMPORTANCE_SCHEMES``: "size" (n_i, FedAvg), "freq" (f_{i,k}), "norm" (‖Δ_{i,k}‖),
        "freq_norm" (f·‖Δ‖, the paper's default), "size_freq_norm" (n·f·‖Δ‖).
    num_samples
        ``[N]`` training-sample counts n_i.
    frequencies
        ``[N, E]`` activation frequencies f_{i,k} = tokens routed to k / tokens through the layer (or ``[N]``: one
        expert unit).
    update_norms
        ``[N, E]`` L2 norms of each client's expert update ‖Δ_{i,k}‖ (or ``[N]``).

    Returns
    -------
    torch.Tensor
        ``[N, E]`` (or ``[N]``) non-negative scores (float64 for a stable normalisation).
    """
    n = num_samples.to(torch.float64).reshape(-1, *[1] * (frequencies.dim() - 1)).expand_as(frequencies)  # [N, E]
    f = frequencies.to(torch.float64)
    norm = update_norms.to(torch.float64)
    table = {
        "size": lambda: n.clone(),
        "freq": lambda: f.clone(),
        "norm": lambda: norm.clone(),
        "freq_norm": lambda: f * norm,
        "size_freq_norm": lambda: n * f * norm,
    }
    if scheme not in table:
        raise ValueError(f"unknown importance scheme {scheme!r}; choose one of {', '.join(IMPORTANCE_SCHEMES)}")
    scores = table[scheme]()
    if (scores < 0).any() or not torch.isfinite(scores).all():
        raise ValueError("importance scores must be finite and non-negative; check sample counts and frequencies")
    return scores


def normalise_columns(scores: torch.Tensor) -> torch.Tensor:
    """w_{i,k} = a_{i,k} / Σ_j a_{j,k}; columns with Σ_j a_{j,k} = 0 become all zero.

    Parameters
    ----------
    scores
        ``[N, E]`` non-negative scores.

    Returns
    -------
    torch.Tensor
        ``[N, E]`` float32 weights whose columns sum to 1, or to 0 where no client has any score.
    """
    totals = scores.sum(dim=0, keepdim=True)  # [1, E]
    weights = torch.where(totals > 0, scores / totals.clamp_min(torch.finfo(scores.dtype).tiny), 0.0)
    return weights.to(torch.float32)


def importance_weights(
    scheme: str,
    num_samples: torch.Tensor,
    frequencies: torch.Tensor,
    update_norms: torch.Tensor,
) -> torch.Tensor:
    """Normalised per-expert aggregation weights ``[N, E]`` (see :func:`importance_scores`)."""
    return normalise_columns(importance_scores(scheme, num_samples, frequencies, update_norms))
