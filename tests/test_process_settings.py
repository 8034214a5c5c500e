"""fcmoe changes nothing in the process at import; between rounds it hands freed heap pages back to the kernel."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from fcmoe import process_memory

GLIBC_ONLY = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")


def test_importing_fcmoe_sets_no_environment_variable_and_calls_no_libc() -> None:
    """Every fcmoe module is imported in a fresh process with ``ctypes.CDLL`` spied on: no variable appears,
    none changes, and no C library is opened (an engine's round is where the release happens). The third-party
    packages fcmoe uses are imported first: what they do at import is theirs (flwr sets GRPC_VERBOSITY)."""
    code = """if True:
        import ctypes, os, pkgutil, importlib
        for name in ("torch", "transformers", "peft", "datasets", "flwr.app", "flwr.serverapp", "flwr.clientapp",
                     "flwr.serverapp.strategy", "flwr.simulation", "flwr_datasets.partitioner", "matplotlib.pyplot",
                     "rich.progress", "safetensors.torch", "pandas", "cryptography.x509"):
            importlib.import_module(name)
        opened = []
        real = ctypes.CDLL
        ctypes.CDLL = lambda name, *a, **k: opened.append(name) or real(name, *a, **k)
        before = dict(os.environ)
        import fcmoe
        for module in pkgutil.walk_packages(fcmoe.__path__, "fcmoe."):
            importlib.import_module(module.name)
        changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
        print(changed, [name for name in opened if "libc" in str(name)])"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] []"


def test_release_calls_malloc_trim_and_is_a_no_op_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(process_memory, "_glibc", lambda: SimpleNamespace(malloc_trim=calls.append))
    process_memory.release_freed_memory()
    assert calls == [0]
    monkeypatch.setattr(process_memory, "_glibc", lambda: None)
    process_memory.release_freed_memory()  # macOS, musl: nothing to do, no error
    assert calls == [0]


def test_a_libc_without_malloc_trim_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    process_memory._glibc.cache_clear()
    monkeypatch.setattr(process_memory.ctypes, "CDLL", lambda name: SimpleNamespace())
    try:
        assert process_memory._glibc() is None
    finally:
        process_memory._glibc.cache_clear()


@GLIBC_ONLY
def test_release_gives_the_holes_of_the_heap_back() -> None:
    """4,000 blocks of 64 KiB from the heap (below glibc's mmap threshold), every other one freed: the holes lie
    below live blocks, where glibc does not trim by itself; the release returns them (in a fresh process)."""
    code = """if True:
        import torch
        from fcmoe.process_memory import release_freed_memory
        def rss():
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
        blocks = [torch.ones(1 << 14) for _ in range(4000)]
        keep = blocks[1::2]
        del blocks
        before = rss(); release_freed_memory(); print(before - rss())"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) > 80 << 20  # ~125 MiB of holes, less what the process reused meanwhile
