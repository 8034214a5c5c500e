"""What fcmoe sets for the process: 2 MiB pages for PyTorch tensors, glibc reuse of freed blocks within a round and
their release between rounds."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from fcmoe import process_memory

GLIBC_ONLY = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")


def test_huge_pages_are_on_unless_the_user_said_otherwise() -> None:
    code = "import os, fcmoe; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == "1"
    env["THP_MEM_ALLOC_ENABLE"] = "0"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == "0"


@pytest.fixture
def fake_glibc(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple]]:
    calls: list[tuple] = []
    libc = SimpleNamespace(mallopt=lambda option, value: calls.append(("mallopt", option, value)) or 1,
                           malloc_trim=lambda pad: calls.append(("malloc_trim", pad)) or 1)
    monkeypatch.setattr(process_memory, "_glibc", lambda: libc)
    yield calls


def test_malloc_tuning_sets_both_thresholds_and_can_be_turned_off(fake_glibc: list[tuple],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FCMOE_MALLOC_TUNING", "0")
    process_memory.reuse_freed_memory()
    process_memory.release_freed_memory()
    assert fake_glibc == []
    monkeypatch.delenv("FCMOE_MALLOC_TUNING")
    process_memory.reuse_freed_memory()
    process_memory.release_freed_memory()
    assert fake_glibc == [("mallopt", -3, 256 << 20), ("mallopt", -1, 1 << 30), ("malloc_trim", 0)]


def test_a_libc_without_glibc_malloc_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> object:
        raise OSError(f"{name}: cannot open shared object file")

    process_memory._glibc.cache_clear()
    monkeypatch.setattr(process_memory.ctypes, "CDLL", missing)
    assert process_memory._glibc() is None
    process_memory.reuse_freed_memory()  # macOS: nothing to tune, no error
    process_memory.release_freed_memory()
    process_memory._glibc.cache_clear()
    monkeypatch.setattr(process_memory.ctypes, "CDLL", lambda name: SimpleNamespace(mallopt=print))  # no malloc_trim
    assert process_memory._glibc() is None
    process_memory._glibc.cache_clear()


@GLIBC_ONLY
def test_release_gives_the_holes_of_the_heap_back() -> None:
    """400 blocks of 1 MiB from the heap, every other one freed: the 200 holes lie below live blocks, where glibc
    does not trim by itself; the release returns them (in a fresh process, so that nothing else is in the heap)."""
    code = """if True:
        import fcmoe, torch
        from fcmoe.process_memory import release_freed_memory
        def rss():
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
        blocks = [torch.ones(1 << 18) for _ in range(400)]
        keep = blocks[1::2]
        del blocks
        before = rss(); release_freed_memory(); print(before - rss())"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) > 150 << 20  # 200 MiB of holes, less what the process reused meanwhile
