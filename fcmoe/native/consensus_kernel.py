"""The native kernel of FC-MoE's one-read server step (:mod:`~fcmoe.native.consensus_read_source`): compiled on
first use, optional.

PyTorch cannot fuse "sum the N client rows of a tile into g, then take each row's inner product with g while the
tile is still in cache": its one-read path stages every ``[E, N, c]`` block into a cache-sized buffer first, and
that copy plus two in-cache matrix products ran at 11–13 GB/s on our 2-core VM against a 38–40 GB/s memcpy. The
C kernel reads the updates where they lie, once (``bench/aggregation.py`` prints both paths side by side).

It is built with the machine's C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``) with ``-O3 -march=native
-ffp-contract=off -fopenmp`` (dropping what the compiler refuses, :data:`OPTIONAL_FLAGS`) into ``<cache>/kernels/``
and loaded with :mod:`ctypes`. Its ``libgomp`` dependency resolves to the one PyTorch has already loaded, so its
parallel loop runs on PyTorch's own OpenMP threads. The file name hashes the source, the compiler, the flags and
the CPU, so a cache shared between machines never loads a build for another CPU. No compiler, a failed build or
``FCMOE_NATIVE=0``: :func:`consensus_read_kernel` returns ``None`` and callers use the PyTorch path, which gives the
same numbers up to float rounding.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from fcmoe.cache import cache_dir
from fcmoe.native.consensus_read_source import SOURCE

log = logging.getLogger(__name__)

SYMBOL = "fcmoe_consensus_read_f32"
FLAGS = ("-O3", "-ffp-contract=off", "-shared", "-fPIC")
# Tried in order, the first that builds wins: a compiler without OpenMP (clang without libomp) or without
# -march=native (some older ones off x86) still gives a kernel, single-threaded or for the baseline instruction set.
OPTIONAL_FLAGS = (("-march=native", "-fopenmp"), ("-march=native",), ("-fopenmp",), ())
# Columns per work item (expert k, chunk): an expert of 1.25 M floats is 20 items, enough to keep every thread busy;
# the split into items is fixed, so per-item partial sums make the result independent of the thread count.
CHUNK = 1 << 16
# Below this many floats per layer a second thread saves less than it costs to start.
PARALLEL_MIN_FLOATS = 1 << 20


class ConsensusRead(NamedTuple):
    """What the kernel measured over the column segments of one MoE layer (fp64 sums per expert)."""

    dots: torch.Tensor  # [E, N]  ⟨Δ_{i,k}, g_k⟩ over all the columns
    squares: torch.Tensor  # [E, N]  ‖Δ_{i,k}‖² over them
    g_squares: torch.Tensor  # [E]  ‖g_k‖² over them


def _compiler() -> str | None:
    named = os.environ.get("CC")
    return named if named else next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def _cpu_identity() -> str:
    """The CPU model and instruction-set flags: what ``-march=native`` compiles for."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(dict.fromkeys(line for line in lines if line.startswith(wanted)))


def _build(compiler: str, source: str) -> Path | None:
    """Compile ``source`` to a shared library in the cache (once per source, compiler, flags and CPU), with the
    first of :data:`OPTIONAL_FLAGS` the compiler accepts."""
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        log.info("fcmoe: cannot run the C compiler %r (%s); using the PyTorch path", compiler, err)
        return None
    folder = cache_dir() / "kernels"
    errors = []
    for flags in ((*FLAGS, *optional) for optional in OPTIONAL_FLAGS):
        key = hashlib.sha256("\0".join([source, *flags, version, _cpu_identity()]).encode()).hexdigest()[:16]
        target = folder / f"consensus_read-{key}.so"
        if target.exists():
            return target
        started = time.perf_counter()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                (Path(tmp) / "consensus_read.c").write_text(source)
                built = Path(tmp) / "kernel.so"
                result = subprocess.run([compiler, *flags, "-o", str(built), str(Path(tmp) / "consensus_read.c")],
                                        capture_output=True, text=True, timeout=120)
                if result.returncode == 0:
                    os.replace(built, target)  # atomic: a concurrent process sees no file or a whole one
                    log.info("fcmoe: built the one-read kernel with %s %s in %.1f s: %s", compiler, " ".join(flags),
                             time.perf_counter() - started, target)
                    return target
                errors.append((result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1])
        except (OSError, subprocess.SubprocessError) as err:
            errors.append(str(err))
    log.info("fcmoe: %s could not build the one-read kernel (%s); using the PyTorch path", compiler, errors[-1])
    return None


def consensus_read_kernel() -> ctypes._CFuncPtr | None:
    """The compiled kernel, or ``None`` where it is turned off (``FCMOE_NATIVE=0``, read at every call) or cannot
    be built (tried once per process)."""
    return None if os.environ.get("FCMOE_NATIVE", "1") == "0" else _load_kernel()


@functools.cache
def _load_kernel() -> ctypes._CFuncPtr | None:
    compiler = _compiler()
    if compiler is None:
        log.info("fcmoe: no C compiler found (set CC); FC-MoE's server step uses the PyTorch path")
        return None
    library = _build(compiler, SOURCE)
    return None if library is None else load_kernel(library)


def load_kernel(library: Path) -> ctypes._CFuncPtr | None:
    """The kernel function of a built library, typed for :func:`consensus_read`; ``None`` if it cannot be loaded."""
    try:
        kernel = getattr(ctypes.CDLL(str(library)), SYMBOL)
    except (OSError, AttributeError) as err:  # e.g. a cache on a noexec mount
        log.info("fcmoe: could not load the one-read kernel %s (%s); using the PyTorch path", library, err)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    kernel.argtypes = [ptr, ptr, i64, i64, i64, i64, ptr, i64, ptr, ptr, ptr, i64, i64]
    kernel.restype = None
    return kernel


def consensus_read(kernel: ctypes._CFuncPtr, segments: Sequence[tuple[list[int], int, torch.Tensor]],
                   weights: torch.Tensor) -> ConsensusRead:
    """Run the kernel on every column segment of one MoE layer, on ``torch.get_num_threads()`` OpenMP threads.

    Parameters
    ----------
    kernel
        :func:`consensus_read_kernel`'s function.
    segments
        ``(row_pointers, width, g)`` per segment: ``N·E`` addresses, client-major (entry ``i·E + k`` is client i's
        expert k, ``width`` contiguous float32; the caller keeps the tensors alive), and the ``[E, width]`` float32
        view with unit column stride that receives g_k = Σ_i w_{i,k} Δ_{i,k} on these columns.
    weights
        ``[E, N]`` float32, contiguous: the importance weights w_{i,k}, expert-major.

    Returns
    -------
    ConsensusRead
        Sums over all the segments' columns.
    """
    e, n = weights.shape
    total = n * e * sum(width for _, width, _ in segments)
    threads = torch.get_num_threads() if total >= PARALLEL_MIN_FLOATS else 1
    sums = torch.zeros(e, 2 * n + 1, dtype=torch.float64)
    for pointers, width, g in segments:
        if width == 0:
            continue
        items_per_expert = -(-width // CHUNK)
        partial = torch.zeros(e * items_per_expert, 2 * n + 1, dtype=torch.float64)  # per item: dots, squares, ‖g‖²
        kernel((ctypes.c_void_p * len(pointers))(*pointers), weights.data_ptr(), n, e, width, CHUNK, g.data_ptr(),
               g.stride(0), partial[:, :n].data_ptr(), partial[:, n:2 * n].data_ptr(), partial[:, 2 * n:].data_ptr(),
               partial.stride(0), threads)
        sums += partial.view(e, items_per_expert, -1).sum(dim=1)  # items in a fixed order: same for any thread count
    return ConsensusRead(sums[:, :n], sums[:, n:2 * n], sums[:, 2 * n])
