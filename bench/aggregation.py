"""Where a round's time goes, and FC-MoE's server step against Flower's own FedAvg on the same replies.

Usage: ``python bench/aggregation.py [--sizes 1e6,1e7,1e8] [--clients 10,50] [--repeats 3] [--phases]``.

Part 1, the server step. For each expert storage form (``--layouts``: fused tensors as in Mixtral / Qwen-MoE, one
module per expert as in Switch and fcmoe's upcycled models) and N clients × F expert floats (one MoE layer, E = 8;
combinations that would not fit in half of this machine's memory are skipped, and say so), measured side by side
in one process:

- ``flower s``: Flower's FedAvg (``aggregate_arrayrecords``) from the N reply ``RecordDict``s to the averaged arrays;
- ``fcmoe wire s``: decoding the same N replies and FC-MoE's whole server step (importance weights, consensus
  projection, the scalar residual messages, FedAvg of shared and router keys); ``ratio`` = fcmoe wire / flower
  (target ≤ 1.5);
- ``fcmoe mem s``: the same step on updates already in memory (the in-process engine).

Each time is the best of ``--repeats`` runs, or of as many more as fill 0.25 s (the small sizes).

Part 2 (``--phases``), the share of a round spent in each phase: one ``fcmoe run`` of the default experiment
(``--methods``, ``--rounds``; checkpointed as ``fcmoe run`` is), with the engine's steps timed where it calls them:
local training (:func:`fcmoe.rounds.client_step`), the server step, evaluation (every client's deployed model on
its test split, and the global model on the global test set) and checkpoint I/O. Target: server step ≤ 2 %.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fcmoe.algorithms import ClientUpdate
from fcmoe.algorithms.fcmoe import FCMoE, FCMoEConfig
from fcmoe.fl.codec import decode_update, encode_update
from fcmoe.models.layout import ExpertLayout
from fcmoe.registry import LAYOUTS

EXPERTS = 8
HIDDEN = 1024


def best_of(repeats: int, fn: Callable[[], object], min_seconds: float = 0.25) -> float:
    """The shortest of at least ``repeats`` runs that together take at least ``min_seconds`` (like ``timeit``'s
    autorange): a few 2 ms steps would sample only 10 ms of a shared machine."""
    times: list[float] = []
    while len(times) < repeats or sum(times) < min_seconds:
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def layer_shapes(layout: str, expert_floats: int) -> dict[str, torch.Size]:
    """One MoE layer of about ``expert_floats`` expert floats (E experts, intermediate size I) in a layout's storage:
    ``fused`` (gate_up [E, 2I, H], down [E, H, I]) or ``per_expert_modules`` (per expert wi [I, H], wo [H, I])."""
    if layout == "fused":
        inter = max(1, round(expert_floats / (3 * EXPERTS * HIDDEN)))
        return {"layers.0.mlp.experts.gate_up_proj": torch.Size([EXPERTS, 2 * inter, HIDDEN]),
                "layers.0.mlp.experts.down_proj": torch.Size([EXPERTS, HIDDEN, inter]),
                "layers.0.mlp.gate.weight": torch.Size([EXPERTS, HIDDEN]),
                "layers.0.norm.weight": torch.Size([HIDDEN])}
    inter = max(1, round(expert_floats / (2 * EXPERTS * HIDDEN)))
    experts = {f"layers.0.mlp.experts.expert_{k}.{name}.weight": torch.Size(shape) for k in range(EXPERTS)
               for name, shape in (("wi", (inter, HIDDEN)), ("wo", (HIDDEN, inter)))}
    return {**experts, "layers.0.mlp.router.classifier.weight": torch.Size([EXPERTS, HIDDEN]),
            "layers.0.norm.weight": torch.Size([HIDDEN])}


def make_updates(shapes: dict[str, torch.Size], clients: int, seed: int = 0) -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(seed)
    updates = []
    for i in range(clients):
        delta = {k: torch.randn(s, generator=gen) * 1e-3 for k, s in shapes.items()}
        counts = torch.randint(1, 1000, (EXPERTS,), generator=gen)
        updates.append(ClientUpdate(i, delta, int(counts.sum()), {"layers.0.mlp": counts}))
    return updates


def server_step_row(layout_name: str, clients: int, expert_floats: int, repeats: int) -> str:
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    shapes = layer_shapes(layout_name, expert_floats)
    layout: ExpertLayout = LAYOUTS.get(layout_name)(shapes, EXPERTS)
    algo = FCMoE(FCMoEConfig(), layout)
    updates = make_updates(shapes, clients)
    global_state = {k: torch.zeros(s) for k, s in shapes.items()}
    replies = [encode_update(u) for u in updates]
    flower = best_of(repeats, lambda: aggregate_arrayrecords(replies, "num-examples"))
    wire = best_of(repeats, lambda: algo.aggregate(global_state, [decode_update(r) for r in replies]))
    replies.clear()
    memory = best_of(repeats, lambda: algo.aggregate(global_state, updates))
    update_bytes = sum(v.numel() * v.element_size() for u in updates for v in u.delta.values())
    return (f"{layout_name[:7]:<7} {clients:>4} {layout.layers[0].expert_numel * EXPERTS / 1e6:>9.1f}M "
            f"{update_bytes / 2**30:>6.2f} {flower:>9.3f} {wire:>12.3f} {wire / flower:>6.2f} {memory:>11.3f}")


class PhaseClock:
    """Seconds spent in each phase, summed over every call of the functions :meth:`wrap` times."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started

        return timed


def phase_profile(methods: str, rounds: int, out: Path) -> None:
    """One default ``fcmoe run`` with the engine's phases timed; prints each phase's share of the rounds' time."""
    from fcmoe.config import load_config
    from fcmoe.runner import run_experiment
    from fcmoe.sim import engine

    clock = PhaseClock()
    phases = {"local training": ("client_step",), "server step": ("server_step",),
              "evaluation": ("local_accuracy", "global_accuracy"), "checkpoint I/O": ("save_checkpoint", "append_row")}
    for phase, names in phases.items():
        for name in names:
            setattr(engine, name, clock.wrap(phase, getattr(engine, name)))
    engine.run_round = clock.wrap("round", engine.run_round)
    config = load_config(overrides=[f"methods={methods.split(',')!r}", f"rounds={rounds}"])
    started = time.perf_counter()
    run_experiment(config, out, show_progress=False)
    total = time.perf_counter() - started
    rounds_s = clock.seconds["round"] + clock.seconds.get("checkpoint I/O", 0.0)
    print(f"\nphases of {rounds} round(s) of {methods} on the default experiment ({total:.0f} s in all; set-up and "
          f"the final models are the rest)")
    print(f"{'phase':<16} {'seconds':>8} {'share':>7}")
    accounted = 0.0
    for phase in phases:
        seconds = clock.seconds.get(phase, 0.0)
        accounted += seconds
        print(f"{phase:<16} {seconds:>8.2f} {100 * seconds / rounds_s:>6.2f}%")
    other = rounds_s - accounted
    print(f"{'other':<16} {other:>8.2f} {100 * other / rounds_s:>6.2f}%")
    print(f"evaluation per round: {clock.seconds.get('evaluation', 0.0) / (rounds * len(methods.split(','))):.2f} s; "
          "target: server step <= 2 % of a round")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1e6,1e7,1e8", help="expert floats per client, comma-separated")
    parser.add_argument("--clients", default="10,50")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layouts", default="fused,per_expert_modules", help="expert storage forms, comma-separated")
    parser.add_argument("--phases", action="store_true", help="also profile a default round by phase")
    parser.add_argument("--methods", default="fcmoe", help="--phases: the methods of the profiled run")
    parser.add_argument("--rounds", type=int, default=2, help="--phases: rounds of the profiled run")
    args = parser.parse_args()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {memory / 2**30:.0f} GiB RAM")
    print(f"{'layout':<7} {'N':>4} {'floats':>10} {'GiB':>6} {'flower s':>9} {'fcmoe wire s':>12} {'ratio':>6} "
          f"{'fcmoe mem s':>11}")
    for layout_name in args.layouts.split(","):
        for clients in (int(c) for c in args.clients.split(",")):
            for floats in (int(float(f)) for f in args.sizes.split(",")):
                need = 4 * clients * floats * 4  # the updates, their wire copies, the stack and Flower's temporaries
                if need > memory / 2:
                    print(f"{layout_name[:7]:<7} {clients:>4} {floats / 1e6:>9.1f}M  skipped: {need / 2**30:.0f} GiB "
                          f"of updates and copies would not fit in half of {memory / 2**30:.0f} GiB")
                    continue
                print(server_step_row(layout_name, clients, floats, args.repeats), flush=True)
    print("target: ratio <= 1.5 (fcmoe wire / flower)")
    if args.phases:
        with tempfile.TemporaryDirectory() as tmp:
            phase_profile(args.methods, args.rounds, Path(tmp))


if __name__ == "__main__":
    main()
