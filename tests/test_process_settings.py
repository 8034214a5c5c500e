"""What importing fcmoe sets for the process: 2 MiB pages for PyTorch tensors, glibc reuse of freed blocks."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

import fcmoe


def test_huge_pages_are_on_unless_the_user_said_otherwise() -> None:
    code = "import os, fcmoe; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == "1"
    env["THP_MEM_ALLOC_ENABLE"] = "0"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == "0"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_malloc_tuning_sets_both_thresholds_and_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    libc = SimpleNamespace(mallopt=lambda option, value: calls.append((option, value)) or 1)
    monkeypatch.setattr(fcmoe.ctypes, "CDLL", lambda name: calls.append(name) or libc)
    monkeypatch.setenv("FCMOE_MALLOC_TUNING", "0")
    fcmoe._reuse_freed_memory()
    assert calls == []
    monkeypatch.delenv("FCMOE_MALLOC_TUNING")
    fcmoe._reuse_freed_memory()
    assert calls == ["libc.so.6", (-3, 256 << 20), (-1, 1 << 30)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


def test_malloc_tuning_skips_a_libc_without_mallopt(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> object:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(fcmoe.ctypes, "CDLL", missing)
    fcmoe._reuse_freed_memory()  # musl, macOS: nothing to tune, no error
