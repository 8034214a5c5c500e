"""FC-MoE's consensus math on a GPU against the CPU one-read step, for client updates that start in host memory.

Usage: ``python bench/gpu_aggregation.py [--device cuda] [--sizes 1e7,1e8] [--clients 10,50] [--repeats 5]``.

Both engines keep client updates in host memory (that is where the wire delivers them), so aggregating on a GPU
first costs a host→device copy of every update. For N clients × F expert floats (one MoE layer, E = 8 experts;
combinations that would not fit in a third of the host's memory are skipped) it prints, side by side in one process:

- ``h2d s``: copying the N updates (pageable, as the engines hold them) into an expert-major ``[E, N, P]`` buffer on
  the device;
- ``device s``: g, ⟨Δ_i, g⟩, the conflict mask and the coefficients there (the batched
  :func:`fcmoe.core.consensus_coefficients`, two reads of the buffer), synchronised; ``device GB/s``: update bytes per
  second of that, against ``d2d GB/s``, the bytes read per second by a 1 GiB device-to-device ``copy_`` (same run);
- ``host s``: the same quantities from the host copies with the one read (the native kernel where it is built);
- ``max diff``: the largest difference between the two results' cosines (they must agree to float rounding).

With ``--device cpu`` the "device" is the host: a check of this script, not a GPU figure.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

from fcmoe.config import ConfigError
from fcmoe.core import ExpertSegment, consensus_coefficients, normalise_columns, one_read_consensus_coefficients
from fcmoe.native import consensus_read_kernel
from fcmoe.training.local import resolve_device

EXPERTS = 8


def best_of(repeats: int, fn: Callable[[], object], device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return min(times)


def copy_bandwidth(device: torch.device, repeats: int) -> float:
    """Bytes read per second by one 1 GiB ``copy_`` on ``device``."""
    src = torch.ones(1 << 28, device=device)
    dst = torch.zeros_like(src)
    return (1 << 30) / best_of(repeats, lambda: dst.copy_(src), device)


def run(clients: int, floats: int, device: torch.device, repeats: int) -> str:
    p = floats // EXPERTS
    gen = torch.Generator().manual_seed(0)
    host = [torch.randn(EXPERTS, p, generator=gen) * 1e-3 for _ in range(clients)]  # client i's [E, P]
    weights = normalise_columns(torch.rand(clients, EXPERTS, generator=gen))  # [N, E]
    norms = torch.stack([torch.linalg.vector_norm(h, dim=1) for h in host])  # [N, E], as clients report them
    on_device = torch.empty(EXPERTS, clients, p, device=device)  # [E, N, P]

    def to_device() -> None:
        for i, h in enumerate(host):
            on_device[:, i].copy_(h)

    h2d = best_of(repeats, to_device, device)
    w_dev, norms_dev = weights.to(device), norms.to(device)
    device_result = consensus_coefficients(on_device.transpose(0, 1), w_dev, 0.0, norms_dev)
    on_dev = best_of(repeats, lambda: consensus_coefficients(on_device.transpose(0, 1), w_dev, 0.0, norms_dev),
                     device)
    bandwidth = copy_bandwidth(device, repeats)
    segments = [ExpertSegment(0, p, host)]
    host_result = one_read_consensus_coefficients(segments, weights, norms, p)
    on_host = best_of(repeats, lambda: one_read_consensus_coefficients(segments, weights, norms, p),
                      torch.device("cpu"))
    diff = (device_result.cosine.cpu() - host_result.cosine).abs().max().item()
    update_bytes = clients * EXPERTS * p * 4
    return (f"{clients:>4} {floats / 1e6:>8.0f}M {update_bytes / 2**30:>6.2f} {h2d:>8.3f} {on_dev:>9.4f} "
            f"{update_bytes / on_dev / 1e9:>11.1f} {bandwidth / 1e9:>9.1f} {on_host:>7.3f} {diff:>9.1e}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (cpu: a check of the script)")
    parser.add_argument("--sizes", default="1e7,1e8", help="expert floats per client, comma-separated")
    parser.add_argument("--clients", default="10,50")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    try:
        device = resolve_device(args.device)
    except ConfigError as err:  # --device cuda on a machine without one: one line, no traceback
        raise SystemExit(str(err)) from None
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "the host (not a GPU figure)"
    print(f"torch {torch.__version__}, device {name}; host step: "
          f"{'native kernel' if consensus_read_kernel() is not None else 'PyTorch path'}")
    print(f"{'N':>4} {'floats':>9} {'GiB':>6} {'h2d s':>8} {'device s':>9} {'device GB/s':>11} {'d2d GB/s':>9} "
          f"{'host s':>7} {'max diff':>9}")
    for clients in (int(c) for c in args.clients.split(",")):
        for floats in (int(float(s)) for s in args.sizes.split(",")):
            need = clients * floats * 4 * (2 if device.type == "cpu" else 1)  # host copies (+ the "device" one)
            if need > memory / 3:
                print(f"{clients:>4} {floats / 1e6:>8.0f}M  skipped: {need / 2**30:.0f} GiB would not fit in a third "
                      f"of {memory / 2**30:.0f} GiB")
                continue
            print(run(clients, floats, device, args.repeats), flush=True)


if __name__ == "__main__":
    main()
