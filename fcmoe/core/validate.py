"""Checks a client update must pass before it may touch the global model.

Flower's own FedAvg turns the global model into NaN after one NaN update and crashes on one wrong-shaped update;
fcmoe rejects such an update (with the reason, for the logs and ``metrics.jsonl``) and aggregates the others.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def update_problem(delta: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                   routing_counts: Mapping[str, torch.Tensor] | None = None,
                   expected_layers: Mapping[str, int] | None = None, num_samples: int = 1,
                   statistics: Mapping[str, torch.Tensor] | None = None) -> str | None:
    """Why an update must be rejected, or ``None`` if it may be aggregated.

    Parameters
    ----------
    delta
        The client's Δ_i, parameter name → tensor.
    expected
        The global tree it applies to: the same keys, shapes and (floating) dtypes are required.
    routing_counts, expected_layers
        The client's per-layer routed-token counts and, per MoE layer, the number of experts E: each layer must be
        present with ``[E]`` non-negative finite counts.
    num_samples
        n_i, must be >= 1.
    statistics
        The algorithm's small per-client tensors (FedMoE's validation routing, HFedMoE's router scores): finite.

    Returns
    -------
    str | None
        One line naming the first problem (key and what is wrong), or ``None``.
    """
    missing = sorted(set(expected) - set(delta))
    if missing:
        return f"missing {len(missing)} parameter(s), e.g. {missing[0]!r}"
    extra = sorted(set(delta) - set(expected))
    if extra:
        return f"unknown parameter(s), e.g. {extra[0]!r}"
    for key, value in delta.items():
        if not isinstance(value, torch.Tensor):
            return f"{key!r} is a {type(value).__name__}, not a tensor"
        if value.shape != expected[key].shape:
            return f"{key!r} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
        if not value.is_floating_point():
            return f"{key!r} has dtype {value.dtype}, expected a floating dtype"
        if not torch.isfinite(value).all():
            return f"{key!r} has non-finite values (NaN or Inf)"
    if num_samples < 1:
        return f"num_samples = {num_samples}, must be >= 1"
    for layer, num_experts in (expected_layers or {}).items():
        counts = (routing_counts or {}).get(layer)
        if counts is None:
            return f"no routing counts for MoE layer {layer!r}"
        if counts.shape != (num_experts,):
            return f"routing counts of {layer!r} have shape {tuple(counts.shape)}, expected ({num_experts},)"
        if not torch.isfinite(counts.double()).all() or (counts < 0).any():
            return f"routing counts of {layer!r} must be finite and non-negative"
    for key, value in (statistics or {}).items():
        if not isinstance(value, torch.Tensor) or not torch.isfinite(value.double()).all():
            return f"statistic {key!r} is not a finite tensor"
    return None
