"""FC-MoE's consensus step from the client updates where they lie: one read, no ``[E, N, P]`` copy.

An MoE layer's expert parameters arrive as *segments*: runs of columns (one per stored tensor kind: a fused
``gate_up_proj``, a ``down_proj``, an expert module's weight) in which client i's expert k is a contiguous row. The
layout (:meth:`~fcmoe.models.layout.ExpertLayout.expert_segments`) says where those rows are; this module reads
them once to get g, ⟨Δ_{i,k}, g_k⟩, ‖g_k‖² and ‖Δ_{i,k}‖ (:func:`one_read_consensus_coefficients`), with the native
kernel where it is built (:mod:`fcmoe.native`), else through cache-sized staged blocks
(:func:`segment_blocks`, :func:`~fcmoe.core.consensus.streamed_consensus_coefficients`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

from fcmoe.core.consensus import (ConsensusCoefficients, check_weights_and_norms, coefficients_from_sums,
                                  streamed_consensus_coefficients)
from fcmoe.native import consensus_read, consensus_read_kernel

ClientRows = torch.Tensor | Sequence[torch.Tensor]


class ExpertSegment(NamedTuple):
    """Columns ``offset:offset + width`` of every client's ``[E, P]`` expert matrix, as stored.

    ``rows[i]`` is client i's part: an ``[E, width]`` tensor whose rows are contiguous (fused storage: a view of
    the stored tensor) or a sequence of E tensors of ``width`` values each, in any shape (one module per expert:
    the stored tensors, read in their memory order).
    """

    offset: int
    width: int
    rows: Sequence[ClientRows]


def segment_blocks(segments: Sequence[ExpertSegment], num_experts: int,
                   block_bytes: int = 16 << 20) -> Iterator[tuple[int, torch.Tensor]]:
    """The segments as ``[E, N, c]`` column blocks of the ``[E, N, P]`` stack, copied into one reused buffer.

    Yields ``(offset, block)``: ``block[k, i]`` is columns ``offset:offset + c`` of client i's expert k. Blocks are
    about ``block_bytes``, small enough to stay in a 32 MiB L3 cache, so a consumer that reads each one twice reads
    the updates from memory mostly once, and large enough to amortise the per-block work (a ~1 ms floor at N = 50):
    the streamed step at N = 50, 10^7 floats took 1.39 / 1.13 / 0.61 / 0.43 / 0.46 s with 2 / 4 / 8 / 16 / 32 MiB
    blocks on our 2-core VM. The buffer is overwritten by the next block.
    """
    if not segments:
        return
    n, e = len(segments[0].rows), num_experts
    first = segments[0].rows[0]
    dtype = first.dtype if isinstance(first, torch.Tensor) else first[0].dtype
    widest = max(segment.width for segment in segments)
    columns = max(1024, block_bytes // (e * n * dtype.itemsize))  # per block
    buffer = torch.empty(e * n * min(columns, widest), dtype=dtype)
    for segment in segments:
        for start in range(0, segment.width, columns):
            stop = min(start + columns, segment.width)
            block = buffer[:e * n * (stop - start)].view(e, n, stop - start)
            if all(isinstance(part, torch.Tensor) for part in segment.rows):  # N strided [E, c] slices
                torch.stack([part[:, start:stop] for part in segment.rows], dim=1, out=block)
            else:  # E·N flat pieces, rows (k, i)
                torch.stack([segment.rows[i][k].reshape(-1)[start:stop] for k in range(e) for i in range(n)],
                            out=block.view(e * n, -1))
            yield segment.offset + start, block


def _row_pointers(segment: ExpertSegment, num_experts: int) -> list[int] | None:
    """Addresses of client i's expert k, client-major, if every row is float32 on the CPU with unit stride."""
    pointers = []
    for part in segment.rows:
        if isinstance(part, torch.Tensor):
            if (part.dtype != torch.float32 or not part.is_cpu or part.shape != (num_experts, segment.width)
                    or (segment.width > 1 and part.stride(1) != 1)):
                return None
            base, step = part.data_ptr(), part.stride(0) * 4
            pointers += [base + k * step for k in range(num_experts)]
        else:
            if len(part) != num_experts or any(
                    row.dtype != torch.float32 or not row.is_cpu or row.numel() != segment.width
                    or not row.is_contiguous() for row in part):
                return None
            pointers += [row.data_ptr() for row in part]
    return pointers


def one_read_consensus_coefficients(segments: Sequence[ExpertSegment], weights: torch.Tensor, norms: torch.Tensor,
                                    numel: int, tau: float = 0.0, out: torch.Tensor | None = None,
                                    native: bool = True) -> ConsensusCoefficients:
    """:func:`~fcmoe.core.consensus.consensus_coefficients` of one MoE layer, reading the updates once in place.

    With float32 updates and the native kernel available, every tile of the rows is read from memory once: g_k
    (paper Eq. consensus) is summed from it and ⟨Δ_{i,k}, g_k⟩, ‖Δ_{i,k}‖² are taken while it is in cache. Otherwise
    the same quantities come from staged ``[E, N, c]`` blocks (:func:`segment_blocks`).

    Parameters
    ----------
    segments
        The layer's expert columns, covering ``0 … numel`` exactly once in order.
    weights
        ``[N, E]`` importance weights, each column summing to 1 (or all zero for an expert nobody used).
    norms
        ``[N, E]`` ‖Δ_{i,k}‖ (clients report them; ``read_norm`` of the result is what this read measured).
    numel
        P, the parameters per expert.
    tau
        Conflict threshold τ on the cosine to the consensus (default 0).
    out
        ``[E, P]`` buffer for g, used when its shape and accumulation dtype fit (saves a page fault per page).
    native
        Use the native kernel when it is available (``False``: always the PyTorch path).

    Returns
    -------
    ConsensusCoefficients
        With ``read_norm`` set; equal to the PyTorch path up to float rounding.
    """
    check_weights_and_norms(weights, norms, tau)
    n, e = weights.shape
    covered = 0
    for segment in segments:
        if segment.offset != covered or len(segment.rows) != n:
            raise ValueError(f"segment at column {segment.offset} with {len(segment.rows)} clients; expected column "
                             f"{covered} and {n} clients")
        covered += segment.width
    if covered != numel:
        raise ValueError(f"segments covered {covered} columns of {numel}")
    kernel = consensus_read_kernel() if native and n > 0 else None
    pointers = [_row_pointers(segment, e) for segment in segments] if kernel is not None else [None]
    if kernel is None or any(p is None for p in pointers):
        return streamed_consensus_coefficients(segment_blocks(segments, e), weights, norms, numel, tau, out)
    g = out if out is not None and out.shape == (e, numel) and out.dtype == torch.float32 else torch.empty(e, numel)
    w_by_expert = weights.to(torch.float32).T.contiguous()  # [E, N]
    sums = consensus_read(kernel, [(rows, segment.width, g[:, segment.offset:segment.offset + segment.width])
                                   for segment, rows in zip(segments, pointers)], w_by_expert)
    coeffs = coefficients_from_sums(g, sums.g_squares.float(), sums.dots.T.float(), norms.float(), weights.float(), tau)
    return coeffs._replace(read_norm=sums.squares.T.sqrt().to(norms.dtype))
