"""FC-MoE's one read of the updates in place: the native kernel against float64 references and the PyTorch path."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from fcmoe.core import (ExpertSegment, consensus_coefficients, normalise_columns, one_read_consensus_coefficients,
                        segment_blocks)
from fcmoe.native import consensus_read_kernel
from fcmoe.native import consensus_kernel as native_module

HAS_COMPILER = native_module._compiler() is not None


def segments_case(seed: int, n: int, e: int, widths: list[int], dtype: torch.dtype = torch.float32
                  ) -> tuple[list[ExpertSegment], torch.Tensor, torch.Tensor]:
    """Segments in both storage forms (strided ``[E, w]`` views of a wider tensor; E flat tensors), their stacked
    ``[N, E, P]`` values and importance weights with one expert nobody used."""
    gen = torch.Generator().manual_seed(seed)
    segments, stacked, offset = [], [], 0
    for j, width in enumerate(widths):
        values = torch.randn(n, e, width, generator=gen).to(dtype) * 1e-2  # [N, E, w]
        values[min(1, n - 1)] = -0.5 * values[0]  # a conflicted pair for certain (when n > 1)
        if j % 2 == 0:  # fused storage: each client's [E, w] is a view with row stride w + 3
            wide = torch.zeros(n, e, width + 3, dtype=dtype)
            wide[:, :, 1:width + 1] = values
            rows = [wide[i, :, 1:width + 1] for i in range(n)]
        else:  # one module per expert
            rows = [[values[i, k].clone() for k in range(e)] for i in range(n)]
        segments.append(ExpertSegment(offset, width, rows))
        stacked.append(values)
        offset += width
    mask = torch.ones(e)
    mask[-1] = 0.0 if e > 1 else 1.0
    weights = normalise_columns(torch.rand(n, e, generator=gen) * mask)
    return segments, torch.cat(stacked, dim=2), weights


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine: the PyTorch path is all there is")
def test_the_kernel_builds_once_per_source_compiler_and_cpu(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FCMOE_CACHE", str(tmp_path))
    source = "void f(void) {}\n"
    built = native_module._build(native_module._compiler(), source)
    assert built is not None and built.parent == tmp_path / "kernels"
    stamp = built.stat().st_mtime_ns
    assert native_module._build(native_module._compiler(), source) == built and built.stat().st_mtime_ns == stamp
    assert native_module._build(native_module._compiler(), source + "\n") != built  # another source, another file
    assert consensus_read_kernel() is not None  # the real kernel, in the session's cache


@pytest.mark.parametrize("n, e, widths", [(1, 1, [1]), (3, 4, [7, 0, 8, 100]), (5, 3, [9000, 13]),
                                          (13, 2, [3, 70_000]), (6, 8, [65_536 * 2 + 5])])
def test_one_read_equals_float64_reference(n: int, e: int, widths: list[int]) -> None:
    """g, c_{i,k}, cos and the measured norms against float64 math, through the kernel and the PyTorch path alike;
    the kernel must run where a compiler exists (else this test would only check the fallback)."""
    segments, stacked, weights = segments_case(n * 100 + e, n, e, widths)
    norms = torch.linalg.vector_norm(stacked, dim=-1)  # [N, E]
    expected = consensus_coefficients(stacked.double(), weights.double(), 0.0)
    assert (consensus_read_kernel() is not None) == HAS_COMPILER
    for native in (True, False):
        got = one_read_consensus_coefficients(segments, weights, norms, stacked.shape[2], 0.0, native=native)
        assert got.consensus.dtype == torch.float32
        assert torch.equal(got.conflicted, expected.conflicted)
        assert got.conflicted.any() == (n > 1)
        torch.testing.assert_close(got.consensus.double(), expected.consensus, rtol=1e-5, atol=1e-8)
        for field in ("coefficient", "cosine", "scale"):
            torch.testing.assert_close(getattr(got, field).double(), getattr(expected, field), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.read_norm, norms, rtol=1e-5, atol=0)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler: no kernel to check")
def test_kernel_results_do_not_depend_on_the_thread_count() -> None:
    segments, stacked, weights = segments_case(7, 4, 8, [3 * 65_536 + 11, 40_000])  # > PARALLEL_MIN_FLOATS
    norms = torch.linalg.vector_norm(stacked, dim=-1)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(one_read_consensus_coefficients(segments, weights, norms, stacked.shape[2]))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for field in ("consensus", "coefficient", "cosine", "scale", "read_norm"):
            assert torch.equal(getattr(other, field), getattr(results[0], field)), field


def test_out_buffer_receives_g_on_both_paths() -> None:
    segments, stacked, weights = segments_case(3, 3, 2, [50, 20])
    norms = torch.linalg.vector_norm(stacked, dim=-1)
    for native in (True, False):
        buffer = torch.empty(2, 70)
        got = one_read_consensus_coefficients(segments, weights, norms, 70, out=buffer, native=native)
        assert got.consensus.data_ptr() == buffer.data_ptr()


def test_updates_the_kernel_cannot_read_take_the_pytorch_path(monkeypatch) -> None:
    """bf16 rows and rows with a column stride go through staged blocks, with the same results."""
    calls = []
    monkeypatch.setattr("fcmoe.core.one_read.consensus_read", lambda *a: calls.append(a))  # must not be called
    segments, stacked, weights = segments_case(5, 4, 3, [33, 17], dtype=torch.bfloat16)
    norms = torch.linalg.vector_norm(stacked.float(), dim=-1)
    got = one_read_consensus_coefficients(segments, weights, norms, 50)
    torch.testing.assert_close(got.consensus, consensus_coefficients(stacked, weights).consensus, rtol=1e-5,
                               atol=1e-7)
    strided = torch.randn(3, 2, 40)[:, :, ::2]  # [N, E, 20], column stride 2
    weights = normalise_columns(torch.rand(3, 2))
    norms = torch.linalg.vector_norm(strided, dim=-1)
    got = one_read_consensus_coefficients([ExpertSegment(0, 20, list(strided))], weights, norms, 20)
    torch.testing.assert_close(got.consensus, consensus_coefficients(strided, weights).consensus)
    assert not calls


def test_the_kernel_can_be_turned_off_or_be_missing(monkeypatch, tmp_path, caplog) -> None:
    monkeypatch.setenv("FCMOE_NATIVE", "0")
    assert consensus_read_kernel() is None
    monkeypatch.delenv("FCMOE_NATIVE")
    monkeypatch.setenv("FCMOE_CACHE", str(tmp_path))
    native_module._load_kernel.cache_clear()
    try:
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        assert native_module._load_kernel() is None
        native_module._load_kernel.cache_clear()
        failing = shutil.which("false")
        if failing is not None:  # a "compiler" that exits 1: the build fails, the reason is logged
            monkeypatch.setenv("CC", failing)
            with caplog.at_level(logging.INFO, logger="fcmoe.native.consensus_kernel"):
                assert native_module._load_kernel() is None
            assert "using the PyTorch path" in caplog.text
    finally:
        native_module._load_kernel.cache_clear()
    assert not (tmp_path / "kernels").exists() or not list((tmp_path / "kernels").glob("*.so"))


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler: no kernel to check")
def test_a_compiler_without_openmp_builds_a_single_threaded_kernel(tmp_path, monkeypatch) -> None:
    """A ``cc`` that refuses -fopenmp (clang without libomp, say) still gives a working kernel, same numbers."""
    wrapper = tmp_path / "cc-without-openmp"
    wrapper.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\n'
                       f'exec {native_module._compiler()} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("FCMOE_CACHE", str(tmp_path / "cache"))
    library = native_module._build(str(wrapper), native_module.SOURCE)
    assert library is not None
    kernel = native_module.load_kernel(library)
    monkeypatch.setattr("fcmoe.core.one_read.consensus_read_kernel", lambda: kernel)
    segments, stacked, weights = segments_case(4, 3, 8, [2 * 65_536 + 1, 500])
    norms = torch.linalg.vector_norm(stacked, dim=-1)
    single = one_read_consensus_coefficients(segments, weights, norms, stacked.shape[2])
    monkeypatch.undo()
    parallel = one_read_consensus_coefficients(segments, weights, norms, stacked.shape[2])
    for field in ("consensus", "coefficient", "cosine", "scale", "read_norm"):
        assert torch.equal(getattr(single, field), getattr(parallel, field)), field


@pytest.mark.skipif(not HAS_COMPILER or not Path("/proc/self/maps").exists(), reason="needs a compiler and Linux")
def test_the_kernel_shares_pytorchs_openmp_runtime() -> None:
    """One libgomp in the process: the kernel's threads are PyTorch's, not a second pool competing with them."""
    assert consensus_read_kernel() is not None
    runtimes = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "libgomp" in line}
    assert len(runtimes) == 1, runtimes


def test_segments_that_do_not_tile_the_columns_are_refused() -> None:
    segments, stacked, weights = segments_case(1, 2, 2, [10, 5])
    norms = torch.linalg.vector_norm(stacked, dim=-1)
    with pytest.raises(ValueError, match="covered 15 columns of 16"):
        one_read_consensus_coefficients(segments, weights, norms, 16)
    with pytest.raises(ValueError, match="expected column 10"):
        one_read_consensus_coefficients([segments[0], segments[1]._replace(offset=9)], weights, norms, 15)
    with pytest.raises(ValueError, match="and 2 clients"):
        one_read_consensus_coefficients([segments[0]._replace(rows=segments[0].rows[:1]), segments[1]], weights,
                                        norms, 15)
    with pytest.raises(ValueError, match="must both be"):
        one_read_consensus_coefficients(segments, weights, norms[:1], 15)


def test_segment_blocks_cover_the_stack_in_order() -> None:
    segments, stacked, _ = segments_case(2, 3, 4, [2500, 7, 1100])
    blocks = list((offset, block.clone()) for offset, block in segment_blocks(segments, 4, block_bytes=1024))
    assert [offset for offset, _ in blocks] == [0, 1024, 2048, 2500, 2507, 3531]
    assert torch.equal(torch.cat([block for _, block in blocks], dim=2), stacked.transpose(0, 1))
