"""Returning a finished round's memory to the operating system (Linux with glibc; elsewhere a no-op).

A round's N client updates are freed when it ends, but glibc keeps freed blocks in the middle of its heaps until
they are trimmed, and a run's long-lived tensors (residuals, the next global state) pin the heap above them: the
default FC-MoE run grew by about a round's updates every round. :func:`release_freed_memory`, called once at the
start of every round by :func:`fcmoe.rounds.start_round` (both engines), hands those pages back
(``docs/performance.md`` has the measurement). Nothing here runs at import.
"""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None  # musl has none


def release_freed_memory() -> None:
    """Return the free pages of every heap to the kernel (``malloc_trim(0)``)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
